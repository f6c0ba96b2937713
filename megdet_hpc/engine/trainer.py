"""The MegDet trainer: builds a config's model and data, resumes, and runs one optimizer step.

Use (what ``python -m megdet_hpc.train`` does)::

    trainer = Trainer(cfg)            # model and datasets; writes nothing
    trainer.open_output_dir(fresh)    # one writer per directory; --no-resume archives the old run
    trainer.resume_or_load()          # newest usable checkpoint, batch layout, optimizer, loader, hooks
    code = trainer.train()            # 0, or 3 (preempted) / 4 (non-finite) from a hook

One step (``run_step``): LR for the images seen, ``grad_accum`` forward/backward passes, then **one**
collective -- the vote -- carrying the loss values, the non-finite flag and every hook's flags.  It is
taken after backward: the device queue is never drained between forward and backward, and the step's
single host synchronisation is the copy of that small vector, at the point where an AMP loop's
``GradScaler`` synchronises anyway.  The skip decision comes before the update, so a non-finite step
changes nothing (weights, optimizer state, BN running statistics restored from a snapshot).
"""

from __future__ import annotations

import logging
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from megdet_hpc import distributed
from megdet_hpc.checkpoint import Checkpointer, CheckpointError
from megdet_hpc.checkpoint import rng as rng_state
from megdet_hpc.config import Config, ConfigError, architecture_differences, to_dict, updated, validate
from megdet_hpc.data.loader import build_train_dataset, build_train_loader, build_val_dataset
from megdet_hpc.data.prefetch import DevicePrefetcher
from megdet_hpc.distributed import Comm
from megdet_hpc.distributed.grad_sync import make_gradient_sync
from megdet_hpc.engine.batch import plan_batch
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
from megdet_hpc.engine.train_loop import HookBase, StepResult, StopTraining, TrainerBase
from megdet_hpc.engine.watchdog import StallWatchdog
from megdet_hpc.evaluation import evaluate
from megdet_hpc.launch.slurm import requeue_job
from megdet_hpc.modeling import build_model, set_sampling_keys
from megdet_hpc.modeling.fit import load_weights
from megdet_hpc.solver import LRSchedule, build_optimizer
from megdet_hpc.utils.cli import EXIT_PREEMPTED

log = logging.getLogger("megdet_hpc.engine")


@dataclass
class Progress:
    iteration: int = 0
    images_seen: int = 0
    nonfinite_streak: int = 0
    position: tuple[int, int] | None = None  # (epoch, batch number) of the last consumed global batch
    sampler_state: dict[str, Any] | None = None  # as resumed, until the first step of this run


def device_type(cfg: Config) -> str:
    """``cuda`` or ``cpu``: what ``train.device`` resolves to here (the comm's backend follows it)."""
    want = cfg.train.device
    return "cuda" if want == "cuda" or (want == "auto" and torch.cuda.is_available()) else "cpu"


def select_device(cfg: Config, local_rank: int) -> torch.device:
    if device_type(cfg) == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("train.device=cuda but no CUDA device is available")
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def configure_backends(cfg: Config, device: torch.device) -> None:
    """Thread count and the CUDA switches of the config (``train.cudnn_benchmark``, ``train.tf32``,
    ``train.deterministic``)."""
    if cfg.train.threads > 0:
        torch.set_num_threads(cfg.train.threads)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = cfg.train.cudnn_benchmark and not cfg.train.deterministic
        torch.backends.cudnn.deterministic = cfg.train.deterministic
        torch.backends.cuda.matmul.allow_tf32 = cfg.train.tf32


class BufferSnapshot:
    """The model's buffers (BN running statistics) as they were before a step, to undo a skipped one:
    preallocated copies refreshed with one fused copy per dtype (not a clone per buffer per step)."""

    def __init__(self, module: torch.nn.Module) -> None:
        groups: dict[tuple[torch.dtype, torch.device], list[torch.Tensor]] = {}
        for buf in module.buffers():
            groups.setdefault((buf.dtype, buf.device), []).append(buf)
        self._pairs = [(live, [b.detach().clone() for b in live]) for live in groups.values()]

    def take(self) -> None:
        with torch.no_grad():
            for live, copies in self._pairs:
                torch._foreach_copy_(copies, live)

    def restore(self) -> None:
        with torch.no_grad():
            for live, copies in self._pairs:
                torch._foreach_copy_(live, copies)


class Trainer(TrainerBase):
    def __init__(self, cfg: Config, comm: Comm | None = None) -> None:
        super().__init__()
        self.comm = comm or distributed.init(device=device_type(cfg))
        self.cfg = cfg
        self.device = select_device(cfg, self.comm.local_rank)
        configure_backends(cfg, self.device)
        self.output_dir = Path(cfg.train.output_dir)
        self.checkpointer = Checkpointer(
            self.output_dir, self.comm, cfg.train.keep_checkpoints, cfg.train.async_checkpoint
        )
        self.stop_flag = StopFlag()
        self.progress = Progress()
        self.watchdog = StallWatchdog(
            cfg.train.stall_timeout_s,
            distributed.active_comms,
            lambda: self.progress.iteration,
            before_exit=self.checkpointer.finish_writing,
        )
        self.max_iter = cfg.solver.max_iter
        # Everything that can be checked is checked before anything is written: data (train and, when
        # the run will evaluate, val), categories against the model.
        self.train_set = build_train_dataset(cfg)
        if cfg.model.num_classes < self.train_set.num_categories:
            raise ConfigError(
                f"model.num_classes={cfg.model.num_classes} but {cfg.data.train_annotations} has "
                f"{self.train_set.num_categories} categories"
            )
        self.val_set = build_val_dataset(cfg) if (cfg.train.eval_at_end or cfg.train.eval_period) else None
        rng_state.seed_all(cfg.train.seed)  # identical initial weights on every rank
        self.model = build_model(cfg)
        self.resumed_from: Path | None = None
        self.archived_to: Path | None = None
        self._opened = False
        self._prepared = False
        self._batches: DevicePrefetcher | None = None

    @property
    def iteration(self) -> int:  # type: ignore[override]
        return self.progress.iteration

    # -- set-up -----------------------------------------------------------------------------------
    def open_output_dir(self, fresh: bool = False) -> None:
        """Collective.  Take the directory (one writer: a second training or a live one is refused);
        ``fresh`` (``--no-resume``) moves an earlier run's files into ``archive/<time>/``."""
        self.checkpointer.open()
        self.archived_to = self.checkpointer.archive_previous_run() if fresh else None
        self._opened = True

    def resume_or_load(self, resume: bool = True, resume_from: Path | None = None) -> Path | None:
        """Collective.  Load the newest usable checkpoint (or ``resume_from``; none with
        ``resume=False``), settle the batch layout for this world size, and build the optimizer,
        gradient sync, loader and hooks.  Returns the checkpoint used."""
        if not self._opened:
            self.open_output_dir()
        path = self.checkpointer.find_valid(resume_from) if (resume or resume_from is not None) else None
        ckpt = self.checkpointer.load(path) if path else None
        if ckpt is not None:
            differences = architecture_differences(ckpt.get("config", {}), self.cfg)
            if differences:
                raise ConfigError(
                    f"{path.name} was trained with another model ({'; '.join(differences)}); "
                    "use another train.output_dir or --no-resume"
                )
        s, d = self.cfg.solver, self.cfg.data
        self.batch = plan_batch(
            self.comm.size,
            d.images_per_gpu,
            s.grad_accum,
            s.total_batch,
            ckpt["total_batch"] if ckpt else None,
            announce=self.comm.is_main,
        )
        # The batch layout actually used is part of the resolved config (and of every checkpoint).
        self.cfg = updated(
            self.cfg,
            {
                "data": {"images_per_gpu": self.batch.images_per_gpu},
                "solver": {"grad_accum": self.batch.grad_accum, "total_batch": self.batch.total},
            },
        )
        validate(self.cfg, self.comm.size)
        if ckpt is not None:
            load_weights(self.model, ckpt["model"], path.name)
        self.model.to(self.device)
        if self.cfg.train.channels_last:
            self.model.to(memory_format=torch.channels_last)
        self._build_optimization(ckpt)
        self.loader, self.sampler = build_train_loader(
            self.cfg, self.train_set, self.comm.rank, self.comm.size, self.device
        )
        self.metrics = MetricsWriter(self.output_dir, self.comm.is_main, self.cfg.train.tensorboard)
        self._buffers = BufferSnapshot(self.model)
        self.resumed_from = path
        if ckpt is not None:
            self._restore(ckpt)
        else:
            rng_state.seed_all(self.cfg.train.seed * 1000 + self.comm.rank)
        self._log_placement()
        if self.comm.is_main:
            log.info("training data: %d images; %s", len(self.train_set), self.train_set.stats.summary())
        self.register_hooks(self.build_hooks())
        self._prepared = True
        return path

    def _log_placement(self) -> None:
        """Collective.  One line naming the host of every rank (``node1: 0-1; node2: 2-3``): where a
        multi-node job really ran, read from its log, and the first thing to check when local ranks
        and GPUs do not match."""
        where = self.comm.allgather_object((socket.gethostname(), self.comm.local_rank))
        hosts: dict[str, list[int]] = {}
        for rank, (host, _) in enumerate(where):
            hosts.setdefault(host, []).append(rank)
        if self.comm.is_main:
            log.info(
                "%d rank(s) on %d host(s): %s",
                self.comm.size,
                len(hosts),
                "; ".join(f"{h}: {','.join(map(str, r))}" for h, r in hosts.items()),
            )

    def _build_optimization(self, ckpt: dict[str, Any] | None) -> None:
        s = self.cfg.solver
        optimizer = build_optimizer(self.cfg, self.model)
        self.sync = make_gradient_sync(
            self.comm,
            self.model,
            optimizer,
            accum=self.batch.grad_accum,
            fp16_compression=s.fp16_compression,
            mode=s.grad_sync,
        )
        if self.comm.is_main:
            log.info(self.sync.describe())
        if (
            ckpt is not None
        ):  # after wrapping: hvd.DistributedOptimizer re-creates the optimizer without its state
            self.sync.optimizer.load_state_dict(ckpt["optimizer"])
        on_cuda = self.device.type == "cuda"
        if s.amp != "off" and not on_cuda and self.comm.is_main:
            log.warning("solver.amp=%s is for CUDA; training in float32 on %s", s.amp, self.device)
        self.amp_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(s.amp) if on_cuda else None
        self.scaler = torch.amp.GradScaler("cuda") if self.amp_dtype == torch.float16 else None
        if self.scaler is not None and ckpt is not None and ckpt.get("scaler"):
            self.scaler.load_state_dict(ckpt["scaler"])
        self.schedule = LRSchedule.from_config(self.cfg)

    def build_hooks(self) -> list[HookBase]:
        t = self.cfg.train
        return [
            StallWatchdogHook(),
            MetricsHook(t.log_period),
            NonFiniteGuard(self.cfg.solver.max_nonfinite),
            PreemptionHook(t.requeue_signals),
            PeriodicCheckpointer(t.checkpoint_period, t.checkpoint_minutes),
            EvalHook(t.eval_period, t.eval_at_end, self.cfg.eval.vis_images),
        ]

    # -- state ------------------------------------------------------------------------------------
    def _restore(self, ckpt: dict[str, Any]) -> None:
        self.progress = Progress(
            ckpt["iteration"], ckpt["images_seen"], ckpt.get("nonfinite_streak", 0), None, ckpt["sampler"]
        )
        try:
            self.sampler.load_state_dict(ckpt["sampler"])
        except ValueError as exc:
            raise CheckpointError(f"{self.resumed_from.name}: {exc}") from exc
        saved_data = ckpt.get("config", {}).get("data", {})
        now_data = to_dict(self.cfg)["data"]
        changed = [
            k for k in ("train_images", "train_annotations") if saved_data.get(k, now_data[k]) != now_data[k]
        ]
        if changed and self.comm.is_main:
            log.warning(
                "training data differs from the checkpoint's (%s): the rest of the epoch follows its image order",
                ", ".join(f"data.{k}: {saved_data[k]} -> {now_data[k]}" for k in changed),
            )
        rngs = ckpt.get("rng") or []
        if len(rngs) == self.comm.size:
            rng_state.restore(rngs[self.comm.rank])
        else:  # another world size: fresh, deterministic per-rank streams
            rng_state.seed_all(self.cfg.train.seed * 1000 + self.comm.rank + 7919 * ckpt["iteration"])
        self.metrics.load_history(ckpt.get("metrics", []))
        if self.comm.is_main:
            log.info(
                "resumed from %s at iteration %d (%d images seen; written by %d ranks, now %d)",
                self.resumed_from,
                self.progress.iteration,
                self.progress.images_seen,
                ckpt["world_size"],
                self.comm.size,
            )

    def sampler_state(self) -> dict[str, Any]:
        p = self.progress
        if p.position is not None:
            return self.sampler.state_after(*p.position)
        return p.sampler_state or self.sampler.initial_state()

    def state_dict(self) -> dict[str, Any]:
        """Collective (gathers every rank's RNG state)."""
        rngs = self.comm.allgather_object(rng_state.capture())
        return {
            "model": self.model.state_dict(),
            "optimizer": self.sync.optimizer.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else {},
            "iteration": self.progress.iteration,
            "images_seen": self.progress.images_seen,
            "nonfinite_streak": self.progress.nonfinite_streak,
            "sampler": self.sampler_state(),
            "rng": rngs,
            "config": to_dict(self.cfg),
            "world_size": self.comm.size,
            "images_per_gpu": self.batch.images_per_gpu,
            "grad_accum": self.batch.grad_accum,
            "total_batch": self.batch.total,
            "metrics": self.metrics.records,
        }

    def save_checkpoint(self, block: bool = False) -> None:
        state = self.state_dict()
        meta = {
            "iteration": self.progress.iteration,
            "images_seen": self.progress.images_seen,
            "world_size": self.comm.size,
            "time": time.time(),
        }
        self.checkpointer.save(self.progress.iteration, state, meta, block=block)

    # -- one step -----------------------------------------------------------------------------------
    def run_step(self) -> StepResult:
        """One optimizer step on every rank; advances iteration, images seen and the sampler position
        (a skipped step consumed its images too)."""
        if self._batches is None:
            self._batches = DevicePrefetcher(iter(self.loader), self.device)
        p, accum = self.progress, self.batch.grad_accum
        lr = self.schedule.lr(p.images_seen, self.batch.total)
        for group in self.sync.optimizer.param_groups:
            group["lr"] = lr
        self.sync.zero_grad()
        self._buffers.take()
        model = self.sync.forward_model
        losses: dict[str, torch.Tensor] = {}
        position = p.position
        for micro in range(accum):
            images, targets, position = next(self._batches)
            step_key = p.images_seen + micro * self.batch.world * self.batch.images_per_gpu
            set_sampling_keys(self.model, step_key, [t["image_id"] for t in targets], self.cfg.train.seed)
            with self.sync.accumulate(last=micro == accum - 1):
                with torch.autocast(
                    self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None
                ):
                    parts = model(images, targets)
                    loss = sum(parts.values()) / accum
                with self.sync.reducing(last=micro == accum - 1):
                    (self.scaler.scale(loss) if self.scaler is not None else loss).backward()
            for name, value in parts.items():
                value = value.detach() / accum
                losses[name] = losses[name] + value if name in losses else value

        grads_bad, unscaled = self._clip_gradients()
        skipped, flags, mean_losses = self._vote(losses, grads_bad)
        if skipped:
            if unscaled:
                self.scaler.update()  # type: ignore[union-attr]
            self.sync.discard()
            self._buffers.restore()
        elif not self.sync.step(self.scaler):  # AMP overflow: GradScaler skipped the update
            self._buffers.restore()
        p.position = position
        p.iteration += 1
        p.images_seen += self.batch.total
        return StepResult(p.iteration, p.images_seen, lr, mean_losses, skipped, flags)

    def _clip_gradients(self) -> tuple[torch.Tensor | None, bool]:
        """``solver.clip_grad_norm``: the averaged gradients' norm (identical on every rank, so no
        collective of its own), clipped; without a GradScaler a non-finite norm joins the vote.
        Returns (the device flag, whether the scaler unscaled)."""
        clip = self.cfg.solver.clip_grad_norm
        if clip <= 0:
            return None, False
        self.sync.synchronize()
        if self.scaler is not None:
            self.scaler.unscale_(self.sync.optimizer)
        params = [q for q in self.model.parameters() if q.grad is not None]
        norm = torch.nn.utils.clip_grad_norm_(params, clip)
        bad = None if self.scaler is not None else ~torch.isfinite(norm)  # AMP overflows are the scaler's
        return bad, self.scaler is not None

    def _vote(
        self, losses: dict[str, torch.Tensor], grads_bad: torch.Tensor | None
    ) -> tuple[bool, dict[str, bool], dict[str, float]]:
        """The step's one collective: [non-finite, loss values..., hook flags...], summed over ranks."""
        names = sorted(losses)
        values = torch.stack([losses[k].float() for k in names])
        bad = ~torch.isfinite(values).all()
        if grads_bad is not None:
            bad = bad | grads_bad
        device_part = torch.cat(
            [bad.reshape(1).to(values.dtype), torch.nan_to_num(values, nan=0.0, posinf=0.0, neginf=0.0)]
        )
        flags = self.vote_flags()
        host_part = torch.tensor([float(v) for v in flags.values()], dtype=torch.float64)
        if self.comm.device.type == "cpu":
            vec = torch.cat([device_part.to("cpu", torch.float64), host_part])  # the step's one host copy
            self.comm.allreduce_(vec, name="megdet.vote")
        else:  # a transport of device memory (NCCL): reduce there, then copy once
            vec = torch.cat([device_part.double(), host_part.to(self.comm.device, non_blocking=True)])
            self.comm.allreduce_(vec, name="megdet.vote")
            vec = vec.cpu()
        size = self.comm.size
        mean_losses = {k: float(v) / size for k, v in zip(names, vec[1 : 1 + len(names)].tolist())}
        agreed = {k: v > 0 for k, v in zip(flags, vec[1 + len(names) :].tolist())}
        return bool(vec[0] > 0), agreed, mean_losses

    # -- policies the hooks call ----------------------------------------------------------------------
    def preempt(self) -> None:
        """Checkpoint (unless this iteration is saved already), requeue under Slurm, stop with code 3."""
        if self.checkpointer.last_saved_iteration != self.progress.iteration:
            self.save_checkpoint(block=True)
        self.checkpointer.wait()
        if self.comm.is_main:
            log.warning(
                "stopped by %s at iteration %d: checkpoint written to %s",
                self.stop_flag.signal_name or "a peer's signal",
                self.progress.iteration,
                self.output_dir,
            )
            if self.cfg.train.requeue and self.stop_flag.requeue:
                requeue_job()
        self.comm.barrier()
        raise StopTraining(EXIT_PREEMPTED)

    def run_eval(self) -> dict[str, Any] | None:
        """COCO evaluation of the current model; None when a preemption signal interrupted it."""
        if self.val_set is None:
            self.val_set = build_val_dataset(self.cfg)
        with self.watchdog.paused():  # its length depends on the validation set, not on a step
            metrics = evaluate(
                self.model,
                self.val_set,
                self.comm,
                self.device,
                self.output_dir / "eval",
                self.cfg.eval.max_images,
                should_stop=lambda: self.stop_flag.raised,
            )
        if metrics is None:
            if self.comm.is_main:
                log.warning("evaluation at iteration %d interrupted by a signal", self.progress.iteration)
            return None
        scalars = {k: v for k, v in metrics.items() if isinstance(v, float)}
        record = {"iteration": self.progress.iteration, **scalars}
        if self._prepared:
            self.metrics.write(record)
        if self.comm.is_main:
            log.info(
                "eval at iteration %d: %s",
                self.progress.iteration,
                ", ".join(f"{k} {v:.4f}" for k, v in scalars.items()),
            )
        return metrics

    def draw_predictions(self, count: int) -> Path | None:
        """A PNG grid of predicted vs ground-truth boxes on the first ``count`` validation images."""
        from megdet_hpc.evaluation.visualize import draw_predictions

        if self.val_set is None:
            return None
        path = draw_predictions(
            self.model, self.val_set, self.device, count, self.output_dir / "eval" / "predictions.png"
        )
        log.info("predictions drawn in %s", path)
        return path

    # -- the loop -------------------------------------------------------------------------------------
    def train(self) -> int:
        if not self._prepared:
            raise RuntimeError("call resume_or_load() before train()")
        self.model.train()
        try:
            return super().train()
        finally:
            if self._batches is not None:
                self._batches.shutdown()
            self.metrics.close()
            self.checkpointer.close()
