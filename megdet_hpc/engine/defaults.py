"""A training run built from a config (detectron2's ``engine/defaults.py``): what
``python -m megdet_hpc.train`` runs.

Use::

    device = select_device(cfg, comm.local_rank)
    configure_process(cfg, device)             # threads, cuDNN / TF32: process-wide, so explicit
    data = TrainingData.load(cfg)              # every input checked; nothing written yet
    checkpointer, archived = open_output_dir(cfg, comm, fresh=False)  # the directory's one writer
    path, ckpt = read_checkpoint(checkpointer, cfg, None, required=False, hint=RESUME_HINT)
    run = TrainingRun.build(cfg, comm, device, data, checkpointer, ckpt)  # everything, before the loop
    run.resume_or_load(path, ckpt)             # only loads state
    code = run.train()                         # 0, or 3 (preempted) / 4 (non-finite) from a hook
    run.close()

``build_run`` does these steps in one call (benchmarks, tests).  The batch layout is settled in
``build`` -- from the checkpoint's total batch when resuming on another world size -- and is part of
the run's resolved config and of every checkpoint it writes.
"""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from megdet_hpc import distributed
from megdet_hpc.checkpoint import Checkpointer, CheckpointError
from megdet_hpc.checkpoint import rng as rng_state
from megdet_hpc.checkpoint.restore import read_checkpoint
from megdet_hpc.config import Config, ConfigError, to_dict, updated, validate
from megdet_hpc.data.coco import CocoDetection
from megdet_hpc.data.loader import build_train_dataset, build_train_loader, build_val_dataset
from megdet_hpc.distributed import Comm
from megdet_hpc.distributed.grad_sync import make_gradient_sync
from megdet_hpc.engine.batch import BatchPlan, plan_batch
from megdet_hpc.engine.hooks import (
    EvalHook,
    MetricsHook,
    NonFiniteGuard,
    PeriodicCheckpointer,
    PreemptionHook,
    StallWatchdogHook,
)
from megdet_hpc.engine.metrics import MetricsWriter
from megdet_hpc.engine.signals import StopFlag
from megdet_hpc.engine.step import SimpleTrainer
from megdet_hpc.engine.train_loop import HookBase
from megdet_hpc.engine.watchdog import StallWatchdog
from megdet_hpc.evaluation import EvaluationInterrupted, evaluate
from megdet_hpc.launch.slurm import requeue_job
from megdet_hpc.modeling import build_model
from megdet_hpc.modeling.fit import check_fits
from megdet_hpc.solver import LRSchedule, build_optimizer

log = logging.getLogger("megdet_hpc.engine")

RESUME_HINT = "use another train.output_dir or --no-resume"


# -- the process -------------------------------------------------------------------------------------
def device_type(cfg: Config) -> str:
    """``cuda`` or ``cpu``: what ``train.device`` resolves to here (the comm's backend follows it)."""
    want = cfg.train.device
    return "cuda" if want == "cuda" or (want == "auto" and torch.cuda.is_available()) else "cpu"


def select_device(cfg: Config, local_rank: int) -> torch.device:
    """This rank's device: GPU ``local_rank`` of the visible ones (one task per GPU), or the CPU."""
    if device_type(cfg) == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("train.device=cuda but no CUDA device is available")
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def configure_process(cfg: Config, device: torch.device) -> None:
    """The process-wide torch settings of a config: thread count (``train.threads``) and, on CUDA,
    ``train.cudnn_benchmark``, ``train.tf32``, ``train.deterministic``.  Never done behind a caller's
    back (a benchmark comparing contenders sets its own)."""
    if cfg.train.threads > 0:
        torch.set_num_threads(cfg.train.threads)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = cfg.train.cudnn_benchmark and not cfg.train.deterministic
        torch.backends.cudnn.deterministic = cfg.train.deterministic
        torch.backends.cuda.matmul.allow_tf32 = cfg.train.tf32


# -- inputs and the directory ------------------------------------------------------------------------
@dataclass
class TrainingData:
    """The datasets of a run, checked before anything is written: train (categories against the
    model) and, when the run will evaluate, val."""

    train: CocoDetection
    val: CocoDetection | None

    @classmethod
    def load(cls, cfg: Config) -> TrainingData:
        train = build_train_dataset(cfg)
        if cfg.model.num_classes < train.num_categories:
            raise ConfigError(
                f"model.num_classes={cfg.model.num_classes} but {cfg.data.train_annotations} has "
                f"{train.num_categories} categories"
            )
        val = build_val_dataset(cfg) if (cfg.train.eval_at_end or cfg.train.eval_period) else None
        return cls(train, val)


def open_output_dir(cfg: Config, comm: Comm, fresh: bool = False) -> tuple[Checkpointer, Path | None]:
    """Collective.  Take ``train.output_dir`` (one writer: a second training or a live one is
    refused); ``fresh`` (``--no-resume``) moves an earlier run's files into ``archive/<time>/``.
    Returns the checkpointer and where the earlier run went."""
    t = cfg.train
    checkpointer = Checkpointer(Path(t.output_dir), comm, t.keep_checkpoints, t.async_checkpoint)
    checkpointer.open()
    return checkpointer, checkpointer.archive_previous_run() if fresh else None


def log_placement(comm: Comm) -> None:
    """Collective.  One line naming the host of every rank (``node1: 0-1; node2: 2-3``): where a
    multi-node job really ran, read from its log, and the first thing to check when local ranks
    and GPUs do not match."""
    where = comm.allgather_object((socket.gethostname(), comm.local_rank))
    hosts: dict[str, list[int]] = {}
    for rank, (host, _) in enumerate(where):
        hosts.setdefault(host, []).append(rank)
    if comm.is_main:
        log.info(
            "%d rank(s) on %d host(s): %s",
            comm.size,
            len(hosts),
            "; ".join(f"{h}: {','.join(map(str, r))}" for h, r in hosts.items()),
        )


def build_step(
    cfg: Config, comm: Comm, device: torch.device, train_set: CocoDetection, batch: BatchPlan
) -> SimpleTrainer:
    """Collective (the gradient sync broadcasts rank 0's initial weights).  The step's parts for
    ``cfg``'s resolved batch layout: the model on ``device`` (seeded: identical on every rank), the
    gradient sync wrapping the optimizer, the AMP scaler (fp16 on CUDA only), the loader and sampler."""
    s = cfg.solver
    rng_state.seed_all(cfg.train.seed)  # identical initial weights on every rank
    model = build_model(cfg).to(device)
    if cfg.train.channels_last:
        model.to(memory_format=torch.channels_last)
    grad_sync = make_gradient_sync(
        comm,
        model,
        build_optimizer(cfg, model),
        accum=batch.grad_accum,
        fp16_compression=s.fp16_compression,
        mode=s.grad_sync,
    )
    if comm.is_main:
        log.info(grad_sync.describe())
    on_cuda = device.type == "cuda"
    if s.amp != "off" and not on_cuda and comm.is_main:
        log.warning("solver.amp=%s is for CUDA; training in float32 on %s", s.amp, device)
    amp_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(s.amp) if on_cuda else None
    loader, sampler = build_train_loader(cfg, train_set, comm.rank, comm.size, device)
    trainer = SimpleTrainer(
        model,
        grad_sync,
        loader,
        sampler,
        LRSchedule.from_config(cfg),
        comm,
        batch,
        s.max_iter,
        device,
        scaler=torch.amp.GradScaler("cuda") if amp_dtype == torch.float16 else None,
        amp_dtype=amp_dtype,
        clip_grad_norm=s.clip_grad_norm,
        sampling_seed=cfg.train.seed,
    )
    return trainer


# -- the run -------------------------------------------------------------------------------------------
class TrainingRun:
    """One training run: the step loop (``SimpleTrainer``) with its hooks, and what the hooks were
    given -- the checkpointer, the metrics writer, the evaluation.  Built complete by ``build``;
    ``resume_or_load`` only loads state; ``close`` releases everything (also after a failure)."""

    def __init__(
        self,
        cfg: Config,
        comm: Comm,
        device: torch.device,
        data: TrainingData,
        checkpointer: Checkpointer,
        trainer: SimpleTrainer,
        metrics: MetricsWriter,
        stop_flag: StopFlag,
        watchdog: StallWatchdog,
    ) -> None:
        self.cfg = cfg  # resolved: the batch layout actually used
        self.comm = comm
        self.device = device
        self.data = data
        self.checkpointer = checkpointer
        self.trainer = trainer
        self.metrics = metrics
        self.stop_flag = stop_flag
        self.watchdog = watchdog
        self.resumed_from: Path | None = None

    @property
    def output_dir(self) -> Path:
        return self.checkpointer.folder

    @property
    def batch(self) -> BatchPlan:
        return self.trainer.batch

    # -- building ---------------------------------------------------------------------------------------
    @classmethod
    def build(
        cls,
        cfg: Config,
        comm: Comm,
        device: torch.device,
        data: TrainingData,
        checkpointer: Checkpointer,
        resume_state: dict[str, Any] | None = None,
    ) -> TrainingRun:
        """Collective.  Settle the batch layout for this world size (keeping ``resume_state``'s total
        batch), then build the model, gradient sync + optimizer, scaler, schedule, loader, metrics,
        watchdog and hooks.  Nothing is loaded: initial weights are the seed's (or ``model.weights``)."""
        s, d = cfg.solver, cfg.data
        batch = plan_batch(
            comm.size,
            d.images_per_gpu,
            s.grad_accum,
            s.total_batch,
            resume_state["total_batch"] if resume_state else None,
            announce=comm.is_main,
        )
        cfg = updated(
            cfg,
            {
                "data": {"images_per_gpu": batch.images_per_gpu},
                "solver": {"grad_accum": batch.grad_accum, "total_batch": batch.total},
            },
        )
        validate(cfg, comm.size)
        trainer = build_step(cfg, comm, device, data.train, batch)
        metrics = MetricsWriter(checkpointer.folder, comm.is_main, cfg.train.tensorboard)
        watchdog = StallWatchdog(
            cfg.train.stall_timeout_s,
            distributed.active_comms,
            lambda: trainer.iteration,
            before_exit=checkpointer.finish_writing,
        )
        run = cls(cfg, comm, device, data, checkpointer, trainer, metrics, StopFlag(), watchdog)
        trainer.register_hooks(run.build_hooks())
        return run

    def build_hooks(self) -> list[HookBase]:
        """The policies, in the order of ``engine/hooks.py``'s docstring, each given what it uses."""
        t, comm = self.cfg.train, self.comm
        preemption = PreemptionHook(
            self.stop_flag,
            t.requeue_signals,
            self.checkpointer,
            self.checkpoint_state,
            comm,
            requeue_job if t.requeue else None,
        )
        draw = (lambda: self.draw_predictions(self.cfg.eval.vis_images)) if self.cfg.eval.vis_images else None
        return [
            StallWatchdogHook(self.watchdog),
            MetricsHook(
                self.metrics,
                t.log_period,
                self.batch.total,
                comm.is_main,
                self.output_dir / "training_curves.png" if t.plots else None,
            ),
            NonFiniteGuard(self.cfg.solver.max_nonfinite),
            preemption,
            PeriodicCheckpointer(
                self.checkpointer,
                self.checkpoint_state,
                t.checkpoint_period,
                t.checkpoint_minutes,
                comm.is_main,
            ),
            EvalHook(
                self.evaluate, t.eval_period, t.eval_at_end, preemption.stop, draw if comm.is_main else None
            ),
        ]

    # -- state ------------------------------------------------------------------------------------------
    def resume_or_load(self, path: Path | None, state: dict[str, Any] | None) -> None:
        """Load ``state`` (read from ``path`` by ``read_checkpoint``): weights, optimizer, scaler,
        progress, sampler, RNG streams, metrics history, the hooks' own state.  Without one, the
        per-rank RNG streams of a fresh run."""
        cfg, comm = self.cfg, self.comm
        self.resumed_from = path
        if state is None:
            rng_state.seed_all(cfg.train.seed * 1000 + comm.rank)
        else:
            assert path is not None
            check_fits(self.trainer.model, state["model"], path.name)  # names the tensors that differ
            try:
                self.trainer.load_state_dict(state)
            except (ValueError, RuntimeError) as exc:  # optimizer groups, sampler state: not this run's
                raise CheckpointError(f"{path.name}: {str(exc).splitlines()[0]}") from exc
            self._warn_if_data_changed(state)
            rngs = state.get("rng") or []
            if len(rngs) == comm.size:
                rng_state.restore(rngs[comm.rank])
            else:  # another world size: fresh, deterministic per-rank streams
                rng_state.seed_all(cfg.train.seed * 1000 + comm.rank + 7919 * state["iteration"])
            self.metrics.load_history(state.get("metrics", []))
            if comm.is_main:
                log.info(
                    "resumed from %s at iteration %d (%d images seen; written by %d ranks, now %d)",
                    path,
                    self.trainer.iteration,
                    self.trainer.progress.images_seen,
                    state["world_size"],
                    comm.size,
                )
        log_placement(comm)
        if comm.is_main:
            log.info("training data: %d images; %s", len(self.data.train), self.data.train.stats.summary())

    def _warn_if_data_changed(self, state: dict[str, Any]) -> None:
        saved = state.get("config", {}).get("data", {})
        now = to_dict(self.cfg)["data"]
        changed = [k for k in ("train_images", "train_annotations") if saved.get(k, now[k]) != now[k]]
        if changed and self.comm.is_main:
            log.warning(
                "training data differs from the checkpoint's (%s): the rest of the epoch follows its image order",
                ", ".join(f"data.{k}: {saved[k]} -> {now[k]}" for k in changed),
            )

    def checkpoint_state(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """Collective (gathers every rank's RNG state): the checkpoint of the current iteration and its
        manifest entry."""
        rngs = self.comm.allgather_object(rng_state.capture())
        p = self.trainer.progress
        state = {
            **self.trainer.state_dict(),
            "rng": rngs,
            "config": to_dict(self.cfg),
            "world_size": self.comm.size,
            "images_per_gpu": self.batch.images_per_gpu,
            "grad_accum": self.batch.grad_accum,
            "total_batch": self.batch.total,
            "metrics": self.metrics.records,
        }
        meta = {
            "iteration": p.iteration,
            "images_seen": p.images_seen,
            "world_size": self.comm.size,
            "time": time.time(),
        }
        return state, meta

    # -- policies -------------------------------------------------------------------------------------
    def evaluate(self) -> dict[str, Any]:
        """Collective.  COCO evaluation of the current model, recorded in ``metrics.jsonl``;
        ``EvaluationInterrupted`` when a preemption signal stopped it."""
        if self.data.val is None:
            self.data.val = build_val_dataset(self.cfg)
        iteration = self.trainer.iteration
        try:
            with self.watchdog.paused():  # its length depends on the validation set, not on a step
                metrics = evaluate(
                    self.trainer.model,
                    self.data.val,
                    self.comm,
                    self.device,
                    self.output_dir / "eval",
                    self.cfg.eval.max_images,
                    should_stop=lambda: self.stop_flag.raised,
                    plots=self.cfg.train.plots,
                )
        except EvaluationInterrupted:
            if self.comm.is_main:
                log.warning("evaluation at iteration %d interrupted by a signal", iteration)
            raise
        scalars = {k: v for k, v in metrics.items() if isinstance(v, float)}
        self.metrics.write({"iteration": iteration, **scalars})
        if self.comm.is_main:
            log.info(
                "eval at iteration %d: %s", iteration, ", ".join(f"{k} {v:.4f}" for k, v in scalars.items())
            )
        return metrics

    def draw_predictions(self, count: int) -> Path | None:
        """A PNG grid of predicted vs ground-truth boxes on the first ``count`` validation images."""
        from megdet_hpc.evaluation.visualize import draw_predictions

        if self.data.val is None:
            return None
        path = draw_predictions(
            self.trainer.model,
            self.data.val,
            self.device,
            count,
            self.output_dir / "eval" / "predictions.png",
        )
        log.info("predictions drawn in %s", path)
        return path

    # -- the loop ---------------------------------------------------------------------------------------
    def train(self) -> int:
        """Run to ``solver.max_iter``; the exit code (0, or the one a hook stopped with)."""
        return self.trainer.train()

    def close(self) -> None:
        """Release the loader thread, the metrics files and the directory lock (after any background
        checkpoint finished).  Safe to call twice."""
        self.trainer.close()
        self.metrics.close()
        self.checkpointer.close()


def build_run(
    cfg: Config,
    comm: Comm,
    *,
    fresh: bool = False,
    resume: bool = True,
    resume_from: Path | None = None,
    on_opened: Callable[[Path | None], None] | None = None,
) -> TrainingRun:
    """Collective.  Every step of the module docstring but ``configure_process`` (the caller's
    choice): a run ready to ``train``; on failure nothing stays open.  ``on_opened(archived_to)``
    runs once the directory is this run's (``train.py`` starts its log file there)."""
    device = select_device(cfg, comm.local_rank)
    data = TrainingData.load(cfg)  # every input checked before anything is written
    checkpointer = None
    run = None
    try:
        checkpointer, archived_to = open_output_dir(cfg, comm, fresh)
        if on_opened is not None:
            on_opened(archived_to)
        path, state = (None, None)
        if resume or resume_from is not None:
            path, state = read_checkpoint(checkpointer, cfg, resume_from, required=False, hint=RESUME_HINT)
        run = TrainingRun.build(cfg, comm, device, data, checkpointer, state)
        run.resume_or_load(path, state)
        return run
    except BaseException:
        if run is not None:
            run.close()
        elif checkpointer is not None:
            checkpointer.close()
        raise
