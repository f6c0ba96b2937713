"""Gradient averaging per backend, behind one small interface the trainer uses.

* horovod: ``hvd.DistributedOptimizer`` (allreduce overlapped with backward, tensor fusion, optional
  fp16 compression, ``backward_passes_per_step`` for accumulation) after broadcasting parameters from
  rank 0.
* torch: ``DistributedDataParallel`` (bucketed, overlapped), ``no_sync`` on accumulation steps.
* mpi / none: one flattened allreduce through ``Comm`` after the last backward.

All three average (sum / world size), so the LR does not depend on the backend.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from megdet_hpc.dist.comm import Comm


class GradientSync:
    """Flattened-bucket allreduce through ``Comm`` (mpi, none, and the fallback for any backend)."""

    def __init__(self, comm: Comm, model: nn.Module, optimizer: torch.optim.Optimizer, **_: Any) -> None:
        self.comm = comm
        self.model = model
        self.optimizer = optimizer
        self._synced = False
        for tensor in model.state_dict().values():  # same start on every rank
            comm.broadcast_(tensor, root=0)

    @property
    def forward_model(self) -> nn.Module:
        return self.model

    @contextlib.contextmanager
    def accumulate(self, last: bool) -> Iterator[None]:
        yield

    def synchronize(self) -> None:
        if self._synced or self.comm.size == 1:
            self._synced = True
            return
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        if grads:
            flat = torch.cat([g.reshape(-1) for g in grads])
            self.comm.allreduce_(flat).div_(self.comm.size)
            offset = 0
            for g in grads:
                g.copy_(flat[offset : offset + g.numel()].view_as(g))
                offset += g.numel()
        self._synced = True

    def step(self, scaler: torch.amp.GradScaler | None = None) -> None:
        self.synchronize()
        with self._no_resync():
            if scaler is not None:
                scaler.step(self.optimizer)
                scaler.update()
            else:
                self.optimizer.step()
        self._synced = False

    def _no_resync(self) -> contextlib.AbstractContextManager[None]:
        """Context in which ``optimizer.step`` must not reduce the gradients again."""
        return contextlib.nullcontext()

    def zero_grad(self) -> None:
        self.optimizer.zero_grad()  # set_to_none is the default (and Horovod takes no argument)
        self._synced = False


class HorovodGradientSync(GradientSync):
    def __init__(self, comm: Comm, model: nn.Module, optimizer: torch.optim.Optimizer, *,
                 accum: int = 1, fp16_compression: bool = False) -> None:  # fmt: skip
        import horovod.torch as hvd

        self.comm, self.model, self._synced = comm, model, False
        hvd.broadcast_parameters(model.state_dict(), root_rank=0)
        # No hvd.broadcast_optimizer_state: every rank loads the optimizer state from the same
        # checkpoint file (after wrapping, since DistributedOptimizer re-creates the optimizer), and
        # on a fresh start there is none.  Its recipe would also take a dummy zero-gradient step that
        # applies weight decay to the initial weights.
        self.optimizer = hvd.DistributedOptimizer(
            optimizer,
            named_parameters=model.named_parameters(),
            compression=hvd.Compression.fp16 if fp16_compression else hvd.Compression.none,
            backward_passes_per_step=accum,
            op=hvd.Average,
        )

    def synchronize(self) -> None:
        if not self._synced:
            self.optimizer.synchronize()
            self._synced = True

    def _no_resync(self) -> contextlib.AbstractContextManager[None]:
        return self.optimizer.skip_synchronize()


class DDPGradientSync(GradientSync):
    def __init__(self, comm: Comm, model: nn.Module, optimizer: torch.optim.Optimizer, **_: Any) -> None:
        from torch.nn.parallel import DistributedDataParallel

        self.comm, self.model, self.optimizer, self._synced = comm, model, optimizer, False
        device_ids = [model_device(model).index] if model_device(model).type == "cuda" else None
        self.ddp = DistributedDataParallel(model, device_ids=device_ids, broadcast_buffers=False)

    @property
    def forward_model(self) -> nn.Module:
        return self.ddp

    @contextlib.contextmanager
    def accumulate(self, last: bool) -> Iterator[None]:
        with contextlib.nullcontext() if last else self.ddp.no_sync():
            yield

    def synchronize(self) -> None:  # DDP averaged during backward
        self._synced = True


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def make_gradient_sync(comm: Comm, model: nn.Module, optimizer: torch.optim.Optimizer, *, accum: int = 1,
                       fp16_compression: bool = False) -> GradientSync:  # fmt: skip
    """The backend's native gradient path (see module docstring)."""
    if comm.name == "horovod" and comm.size > 1:
        return HorovodGradientSync(comm, model, optimizer, accum=accum, fp16_compression=fp16_compression)
    if comm.name == "torch" and comm.size > 1:
        return DDPGradientSync(comm, model, optimizer)
    return GradientSync(comm, model, optimizer)
