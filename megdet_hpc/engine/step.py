"""One optimizer step of MegDet training, from explicit parts (detectron2's ``SimpleTrainer`` shape).

``SimpleTrainer`` is given everything it uses -- the model, the gradient sync that owns the
optimizer, the loader and its sampler, the LR schedule, the comm, the batch layout and the AMP
scaler -- and owns nothing else: no config, no output directory, no policy.  It can be built and
stepped in-process on CPU (``tests/engine/test_step.py``); ``engine/defaults.py`` builds its parts
from a config.

One step (``run_step``): LR for the images seen, ``grad_accum`` forward/backward passes, then **one**
collective -- the vote -- carrying the loss values, the non-finite flag and every hook's flags.  It is
taken after backward: the device queue is never drained between forward and backward, and the step's
single host synchronisation is the copy of that small vector, at the point where an AMP loop's
``GradScaler`` synchronises anyway.  The skip decision comes before the update, so a non-finite step
changes nothing (weights, optimizer state, BN running statistics restored from a snapshot).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from megdet_hpc.data.prefetch import DevicePrefetcher
from megdet_hpc.data.sampler import ResumableGroupedSampler
from megdet_hpc.distributed import Comm
from megdet_hpc.distributed.grad_sync import GradientSync
from megdet_hpc.engine.batch import BatchPlan
from megdet_hpc.engine.train_loop import StepResult, TrainerBase
from megdet_hpc.modeling import set_sampling_keys
from megdet_hpc.solver.schedule import LRSchedule


@dataclass
class Progress:
    """Where training stands; identical on every rank, and part of every checkpoint."""

    iteration: int = 0
    images_seen: int = 0
    position: tuple[int, int] | None = None  # (epoch, batch number) of the last consumed global batch
    sampler_state: dict[str, Any] | None = None  # as resumed, until the first step of this run


class BufferSnapshot:
    """The model's buffers (BN running statistics) as they were before a step, to undo a skipped one:
    preallocated copies refreshed with one fused copy per dtype (not a clone per buffer per step)."""

    def __init__(self, module: nn.Module) -> None:
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


class SimpleTrainer(TrainerBase):
    """The step loop of one rank.  ``grad_sync`` averages the gradients and owns the optimizer
    (Horovod's ``DistributedOptimizer`` wraps it); ``loader`` yields ``(images, targets, position)``
    in the order ``sampler`` dictates; ``sampling_seed`` keys the sync-free proposal sampling."""

    def __init__(
        self,
        model: nn.Module,
        grad_sync: GradientSync,
        loader: Iterable[Any],
        sampler: ResumableGroupedSampler,
        schedule: LRSchedule,
        comm: Comm,
        batch: BatchPlan,
        max_iter: int,
        device: torch.device,
        *,
        scaler: torch.amp.GradScaler | None = None,
        amp_dtype: torch.dtype | None = None,
        clip_grad_norm: float = 0.0,
        sampling_seed: int = 0,
    ) -> None:
        super().__init__()
        self.model = model
        self.grad_sync = grad_sync
        self.loader = loader
        self.sampler = sampler
        self.schedule = schedule
        self.comm = comm
        self.batch = batch
        self.max_iter = max_iter
        self.device = device
        self.scaler = scaler
        self.amp_dtype = amp_dtype
        self.clip_grad_norm = clip_grad_norm
        self.sampling_seed = sampling_seed
        self.progress = Progress()
        self._buffers = BufferSnapshot(model)
        self._batches: DevicePrefetcher | None = None

    @property
    def iteration(self) -> int:  # type: ignore[override]
        return self.progress.iteration

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        return self.grad_sync.optimizer

    # -- state ----------------------------------------------------------------------------------------
    def sampler_state(self) -> dict[str, Any]:
        """The sampler's state after the last consumed batch (what a resumed run continues from)."""
        p = self.progress
        if p.position is not None:
            return self.sampler.state_after(*p.position)
        return p.sampler_state or self.sampler.initial_state()

    def state_dict(self) -> dict[str, Any]:
        """This rank's training state (no collective): weights, optimizer, scaler, progress, sampler and
        the hooks' own state."""
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else {},
            "iteration": self.progress.iteration,
            "images_seen": self.progress.images_seen,
            "sampler": self.sampler_state(),
            "hooks": self.hooks_state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore ``state_dict``'s content (``modeling.fit.check_fits`` names mismatched weights
        first); an optimizer or sampler state that does not fit these parts raises ``ValueError``."""
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.sampler.load_state_dict(state["sampler"])
        self.progress = Progress(state["iteration"], state["images_seen"], None, state["sampler"])
        hooks = dict(state.get("hooks") or {})
        if "nonfinite_streak" in state:  # checkpoints written before hooks kept their own state
            hooks.setdefault("NonFiniteGuard", {"streak": state["nonfinite_streak"]})
        self.load_hooks_state_dict(hooks)

    # -- one step -----------------------------------------------------------------------------------
    def run_step(self) -> StepResult:
        """One optimizer step on every rank; advances iteration, images seen and the sampler position
        (a skipped step consumed its images too)."""
        if self._batches is None:
            self._batches = DevicePrefetcher(iter(self.loader), self.device)
        p, accum = self.progress, self.batch.grad_accum
        lr = self.schedule.lr(p.images_seen, self.batch.total)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.grad_sync.zero_grad()
        self._buffers.take()
        model = self.grad_sync.forward_model
        losses: dict[str, torch.Tensor] = {}
        position = p.position
        for micro in range(accum):
            images, targets, position = next(self._batches)
            step_key = p.images_seen + micro * self.batch.world * self.batch.images_per_gpu
            set_sampling_keys(self.model, step_key, [t["image_id"] for t in targets], self.sampling_seed)
            with self.grad_sync.accumulate(last=micro == accum - 1):
                with torch.autocast(
                    self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None
                ):
                    parts = model(images, targets)
                    loss = sum(parts.values()) / accum
                with self.grad_sync.reducing(last=micro == accum - 1):
                    (self.scaler.scale(loss) if self.scaler is not None else loss).backward()
            for name, value in parts.items():
                value = value.detach() / accum
                losses[name] = losses[name] + value if name in losses else value

        grads_bad, unscaled = self._clip_gradients()
        skipped, flags, mean_losses = self._vote(losses, grads_bad)
        if skipped:
            if unscaled:
                self.scaler.update()  # type: ignore[union-attr]
            self.grad_sync.discard()
            self._buffers.restore()
        elif not self.grad_sync.step(self.scaler):  # AMP overflow: GradScaler skipped the update
            self._buffers.restore()
        p.position = position
        p.iteration += 1
        p.images_seen += self.batch.total
        return StepResult(p.iteration, p.images_seen, lr, mean_losses, skipped, flags)

    def _clip_gradients(self) -> tuple[torch.Tensor | None, bool]:
        """``clip_grad_norm``: the averaged gradients' norm (identical on every rank, so no collective
        of its own), clipped; without a GradScaler a non-finite norm joins the vote.
        Returns (the device flag, whether the scaler unscaled)."""
        if self.clip_grad_norm <= 0:
            return None, False
        self.grad_sync.synchronize()
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        params = [q for q in self.model.parameters() if q.grad is not None]
        norm = torch.nn.utils.clip_grad_norm_(params, self.clip_grad_norm)
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

    # -- the loop -------------------------------------------------------------------------------------
    def train(self) -> int:
        self.model.train()
        return super().train()

    def close(self) -> None:
        """Stop the prefetch thread (and its loader workers); safe to call twice."""
        if self._batches is not None:
            self._batches.shutdown()
            self._batches = None
