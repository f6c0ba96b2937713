"""The MegDet training loop: distributed, resumable, preemption-safe.

One optimizer step = ``grad_accum`` micro-batches of ``images_per_gpu`` images on every rank.  Before
each backward all ranks do **one** small allreduce that carries the loss components (for logging),
a non-finite flag and the preemption flag, so every rank takes the same decision: skip a non-finite
step (reported with its iteration; abort after ``solver.max_nonfinite`` in a row), or stop after this
step, checkpoint and exit.  The LR is ``LRSchedule.lr(images_seen)``; the sampler state saved is the
one of the batches actually consumed.
"""

from __future__ import annotations

import logging
import os
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from megdet_hpc import distributed
from megdet_hpc.checkpoint import Checkpointer
from megdet_hpc.checkpoint import rng as rng_state
from megdet_hpc.config import Config, to_dict
from megdet_hpc.data.loader import build_train_dataset, build_train_loader, build_val_dataset, shutdown_loader
from megdet_hpc.distributed.grad_sync import make_gradient_sync
from megdet_hpc.engine.batch import plan_batch
from megdet_hpc.engine.metrics import MetricsWriter
from megdet_hpc.engine.signals import EXIT_NONFINITE, EXIT_OK, EXIT_PREEMPTED, StopFlag
from megdet_hpc.evaluation import evaluate
from megdet_hpc.modeling import build_model, set_sampling_keys
from megdet_hpc.solver import LRSchedule, build_optimizer
from megdet_hpc.utils_logging import progress_bar

log = logging.getLogger("megdet_hpc.engine")


class NonFiniteLossError(RuntimeError):
    pass


@dataclass
class Progress:
    iteration: int = 0
    images_seen: int = 0
    nonfinite_streak: int = 0
    sampler: dict[str, Any] = field(default_factory=dict)


def select_device(cfg: Config, local_rank: int) -> torch.device:
    want = cfg.train.device
    if want == "cuda" or (want == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ValueError("train.device=cuda but no CUDA device is available")
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


class Trainer:
    def __init__(self, cfg: Config, resume: bool = True, resume_from: Path | None = None) -> None:
        self.cfg = cfg
        self.comm = distributed.init()
        self.output_dir = Path(cfg.train.output_dir)
        self.device = select_device(cfg, self.comm.local_rank)
        if cfg.train.threads > 0:
            torch.set_num_threads(cfg.train.threads)
        self.checkpointer = Checkpointer(self.output_dir, self.comm, cfg.train.keep_checkpoints,
                                         cfg.train.async_checkpoint)  # fmt: skip
        if not resume and resume_from is None:
            self.checkpointer.archive_previous_run()
        ckpt_path = self.checkpointer.find_valid(resume_from) if (resume or resume_from) else None
        self.resumed_from = ckpt_path
        ckpt = self.checkpointer.load(ckpt_path) if ckpt_path else None
        s, d = cfg.solver, cfg.data
        self.batch = plan_batch(self.comm.size, d.images_per_gpu, s.grad_accum, s.total_batch,
                                ckpt["total_batch"] if ckpt else None)  # fmt: skip

        rng_state.seed_all(cfg.train.seed)  # identical initial weights on every rank
        self.model = build_model(cfg)
        if ckpt:
            self.model.load_state_dict(ckpt["model"])
        self.model.to(self.device)
        if cfg.train.channels_last:
            self.model.to(memory_format=torch.channels_last)
        optimizer = build_optimizer(cfg, self.model)
        self.sync = make_gradient_sync(self.comm, self.model, optimizer, accum=self.batch.grad_accum,
                                       fp16_compression=s.fp16_compression, mode=s.grad_sync)  # fmt: skip
        log.info(self.sync.describe())
        if ckpt:  # after wrapping: hvd.DistributedOptimizer re-creates the optimizer without its state
            self.sync.optimizer.load_state_dict(ckpt["optimizer"])
        self.scaler = torch.amp.GradScaler("cuda") if (s.amp and self.device.type == "cuda") else None
        if self.scaler is not None and ckpt and ckpt.get("scaler"):
            self.scaler.load_state_dict(ckpt["scaler"])
        self.schedule = LRSchedule.from_config(cfg)

        # The batch layout actually used is part of the resolved config (and of every checkpoint).
        d.images_per_gpu, s.grad_accum, s.total_batch = (
            self.batch.images_per_gpu,
            self.batch.grad_accum,
            self.batch.total,
        )
        self.dataset = build_train_dataset(cfg)
        self.loader, self.sampler = build_train_loader(cfg, self.dataset, self.comm.rank, self.comm.size)
        self.progress = Progress()
        self.metrics = MetricsWriter(self.output_dir, self.comm.is_main, cfg.train.tensorboard)
        if ckpt:
            self._restore(ckpt)
        else:
            rng_state.seed_all(cfg.train.seed * 1000 + self.comm.rank)
        self.stop = StopFlag()
        self._last_ckpt_time = time.monotonic()
        self._time_checkpoint_due = False

    # -- state ----------------------------------------------------------------------------------------
    def _restore(self, ckpt: dict[str, Any]) -> None:
        self.progress = Progress(ckpt["iteration"], ckpt["images_seen"], ckpt.get("nonfinite_streak", 0),
                                 ckpt["sampler"])  # fmt: skip
        self.sampler.load_state_dict(ckpt["sampler"])
        rngs = ckpt.get("rng") or []
        if len(rngs) == self.comm.size:
            rng_state.restore(rngs[self.comm.rank])
        else:  # another world size: fresh, deterministic per-rank streams
            rng_state.seed_all(self.cfg.train.seed * 1000 + self.comm.rank + 7919 * ckpt["iteration"])
        self.metrics.load_history(ckpt.get("metrics", []))
        if self.comm.is_main:
            log.info("resumed from %s at iteration %d (%d images seen; written by %d ranks, now %d)",
                     self.resumed_from, self.progress.iteration, self.progress.images_seen,
                     ckpt["world_size"], self.comm.size)  # fmt: skip

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
            "sampler": self.progress.sampler,
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
        meta = {"iteration": self.progress.iteration, "images_seen": self.progress.images_seen,
                "world_size": self.comm.size, "time": time.time()}  # fmt: skip
        self.checkpointer.save(self.progress.iteration, state, meta, block=block)
        self._last_ckpt_time = time.monotonic()

    def train_step(self, data_iter: Any) -> tuple[float, dict[str, float], bool, bool]:
        """Set the LR for the images seen, run one optimizer step, advance the progress (iteration,
        images seen, sampler position; a skipped step consumed its images too).
        Returns (lr, mean losses, whether the step was skipped as non-finite, whether to stop)."""
        p = self.progress
        lr = self.schedule.lr(p.images_seen, self.batch.total)
        for group in self.sync.optimizer.param_groups:
            group["lr"] = lr
        losses, nonfinite, stop, position = self._step(data_iter)
        p.sampler = self.sampler.state_after(*position)
        p.iteration += 1
        p.images_seen += self.batch.total
        return lr, losses, nonfinite, stop

    # -- one step ---------------------------------------------------------------------------------------
    def _vote(self, losses: dict[str, torch.Tensor]) -> tuple[bool, bool, dict[str, float]]:
        """One allreduce: [non-finite count, stop count, checkpoint-time flag, losses...].

        The checkpoint-time flag is raised by rank 0's clock only, so a time-based checkpoint
        happens on every rank at the same iteration without a collective of its own.
        """
        names = sorted(losses)
        # One device-to-host copy for all loss terms (not one sync per term on a GPU).
        values = torch.stack([losses[k].detach().float() for k in names]).to("cpu", torch.float64)
        finite = bool(torch.isfinite(values).all())
        minutes = self.cfg.train.checkpoint_minutes
        time_due = (self.comm.is_main and minutes > 0
                    and time.monotonic() - self._last_ckpt_time >= minutes * 60)  # fmt: skip
        flags = torch.tensor(
            [0.0 if finite else 1.0, float(self.stop.raised), float(time_due)], dtype=torch.float64
        )
        vec = torch.cat([flags, torch.nan_to_num(values, nan=0.0, posinf=0.0, neginf=0.0)])
        self.comm.allreduce_(vec, name="megdet.vote")
        self._time_checkpoint_due = self._time_checkpoint_due or vec[2].item() > 0
        mean = {k: float(v) / self.comm.size for k, v in zip(names, vec[3:])}
        return vec[0].item() > 0, vec[1].item() > 0, mean

    def _step(self, data_iter: Any) -> tuple[dict[str, float], bool, bool, tuple[int, int]]:
        model = self.sync.forward_model
        self.sync.zero_grad()
        # BN running statistics change in forward: keep a copy (a few KiB) so a skipped step leaves
        # the model exactly as it was.
        saved_buffers = [b.detach().clone() for b in self.model.buffers()]
        totals: dict[str, float] = {}
        nonfinite = stop = False
        position = (0, 0)
        accum = self.batch.grad_accum
        for micro in range(accum):
            images, targets, position = next(data_iter)
            images = [img.to(self.device, non_blocking=True) for img in images]
            targets = [{k: (v.to(self.device) if torch.is_tensor(v) else v) for k, v in t.items()}
                       for t in targets]  # fmt: skip
            step_key = self.progress.images_seen + micro * self.batch.world * self.batch.images_per_gpu
            set_sampling_keys(self.model, step_key, [t["image_id"] for t in targets], self.cfg.train.seed)
            with (
                self.sync.accumulate(last=micro == accum - 1),
                torch.autocast(self.device.type, enabled=self.scaler is not None),
            ):
                losses = model(images, targets)
                loss = sum(losses.values()) / accum
                bad, stop_now, mean = self._vote(losses)
                stop = stop or stop_now
                if bad:
                    nonfinite = True
                    break
                (self.scaler.scale(loss) if self.scaler is not None else loss).backward()
            for k, v in mean.items():
                totals[k] = totals.get(k, 0.0) + v / accum
        if nonfinite:
            self._skip_step(saved_buffers)
            return totals, True, stop, position
        clip = self.cfg.solver.clip_grad_norm
        if clip > 0:
            # Averaged gradients are identical on every rank: the norm check needs no collective.
            self.sync.synchronize()
            if self.scaler is not None:
                self.scaler.unscale_(self.sync.optimizer)
            norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip)
            if not torch.isfinite(norm) and self.scaler is None:
                self._skip_step(saved_buffers)
                return totals, True, stop, position
        self.sync.step(self.scaler)
        return totals, False, stop, position

    def _skip_step(self, saved_buffers: list[torch.Tensor]) -> None:
        self.sync.zero_grad()
        with torch.no_grad():
            for buf, old in zip(self.model.buffers(), saved_buffers):
                buf.copy_(old)

    # -- the loop ---------------------------------------------------------------------------------------
    def train(self) -> int:
        cfg, p = self.cfg, self.progress
        max_iter = cfg.solver.max_iter
        self.stop.install(cfg.train.requeue_signals)
        self.model.train()
        data_iter = iter(self.loader)
        bar = progress_bar(max_iter, "train", self.comm.is_main, initial=p.iteration, unit="it")
        window_start, window_images = time.perf_counter(), 0
        exit_code = EXIT_OK
        try:
            while p.iteration < max_iter:
                lr, losses, nonfinite, stop = self.train_step(data_iter)
                if nonfinite:
                    p.nonfinite_streak += 1
                    msg = (f"non-finite loss or gradient at iteration {p.iteration - 1} on at least one rank "
                           f"({p.nonfinite_streak} in a row); step skipped, model unchanged")  # fmt: skip
                    log.error(msg)
                    if p.nonfinite_streak >= cfg.solver.max_nonfinite:
                        raise NonFiniteLossError(f"{msg}; aborting after solver.max_nonfinite="
                                                 f"{cfg.solver.max_nonfinite}")  # fmt: skip
                else:
                    p.nonfinite_streak = 0
                window_images += self.batch.total
                bar.update(1)
                if p.iteration % cfg.train.log_period == 0 or p.iteration == max_iter:
                    elapsed = time.perf_counter() - window_start
                    record = {"iteration": p.iteration, "images_seen": p.images_seen, "lr": lr,
                              "loss": sum(losses.values()), **{f"loss/{k}": v for k, v in losses.items()},
                              "images_per_s": window_images / max(elapsed, 1e-9),
                              "s_per_iter": elapsed / max(window_images / self.batch.total, 1)}  # fmt: skip
                    self.metrics.write(record)
                    bar.set_postfix(loss=f"{record['loss']:.3f}", lr=f"{lr:.4f}",
                                    ips=f"{record['images_per_s']:.1f}", refresh=False)  # fmt: skip
                    window_start, window_images = time.perf_counter(), 0
                if stop:
                    bar.close()
                    self._preempted()
                    exit_code = EXIT_PREEMPTED
                    break
                if self._checkpoint_due():
                    self.save_checkpoint()
                if (
                    cfg.train.eval_period
                    and p.iteration % cfg.train.eval_period == 0
                    and p.iteration < max_iter
                ):
                    self.run_eval()
            else:
                bar.close()
                self.save_checkpoint(block=True)
                if cfg.train.eval_at_end:
                    self.run_eval()
                if self.comm.is_main:
                    plot = self.metrics.plot(self.output_dir / "training_curves.png")
                    log.info("training done: %d iterations; curves in %s", p.iteration, plot)
        except NonFiniteLossError as exc:
            log.error("%s", exc)
            exit_code = EXIT_NONFINITE
        finally:
            shutdown_loader(data_iter)
            self.checkpointer.wait()
            self.stop.uninstall()
            self.metrics.close()
        return exit_code

    def _checkpoint_due(self) -> bool:
        t = self.cfg.train
        by_iter = t.checkpoint_period > 0 and self.progress.iteration % t.checkpoint_period == 0
        due, self._time_checkpoint_due = by_iter or self._time_checkpoint_due, False
        return due

    def _preempted(self) -> None:
        self.save_checkpoint(block=True)
        if self.comm.is_main:
            log.warning("stopped by %s at iteration %d: checkpoint written to %s",
                        self.stop.signal_name or "a peer's signal", self.progress.iteration,
                        self.checkpointer.pointer.parent)  # fmt: skip
            if self.cfg.train.requeue:
                requeue_slurm_job()
        self.comm.barrier()

    def run_eval(self) -> dict[str, float]:
        val = build_val_dataset(self.cfg)
        metrics = evaluate(self.model, val, self.comm, self.device, self.output_dir / "eval",
                           self.cfg.eval.max_images)  # fmt: skip
        record = {"iteration": self.progress.iteration, **metrics}
        self.metrics.write(record)
        if self.comm.is_main:
            log.info("eval at iteration %d: %s", self.progress.iteration,
                     ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))  # fmt: skip
        return metrics


def requeue_slurm_job() -> bool:
    """``scontrol requeue`` this job (array-aware) when running under Slurm; True if requeued."""
    job = os.environ.get("SLURM_JOB_ID")
    if not job:
        return False
    if os.environ.get("SLURM_ARRAY_JOB_ID") and os.environ.get("SLURM_ARRAY_TASK_ID"):
        job = f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ['SLURM_ARRAY_TASK_ID']}"
    proc = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True)
    if proc.returncode != 0:
        log.error("scontrol requeue %s failed: %s", job, proc.stderr.strip())
        return False
    log.warning("requeued Slurm job %s", job)
    return True
