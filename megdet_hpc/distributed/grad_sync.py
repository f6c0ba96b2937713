"""Gradient averaging per backend, behind one small interface the trainer uses.

Overlapped (the default for horovod and torch):

* horovod: ``hvd.DistributedOptimizer`` (allreduce overlapped with backward, tensor fusion, optional
  fp16 compression, ``backward_passes_per_step`` for accumulation) after broadcasting parameters from
  rank 0.
* torch: ``DistributedDataParallel`` (bucketed, overlapped), ``no_sync`` on accumulation steps.

After backward (any backend with ``solver.grad_sync=after_backward``; the mpi backend's only path):
one coalesced allreduce through ``Comm`` after the last backward -- Horovod ``grouped_allreduce_``,
gloo one flat buffer, MPI in place per tensor (no flatten/unflatten copies, which cost more than the
reduction on shared memory).

All average (sum / world size), so the LR does not depend on the backend.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from megdet_hpc.distributed.comm import Comm, CommError


def scaler_will_skip(scaler: torch.amp.GradScaler, optimizer: torch.optim.Optimizer) -> bool:
    """Whether ``scaler.step(optimizer)`` is about to skip the update (non-finite unscaled gradients).

    Unscales first when nobody has (``scaler.step`` would), then reads the same per-device flags
    ``scaler.step`` reads with ``.item()``: at the same point of the queue, so its own read is then
    free -- no host synchronisation beyond the one GradScaler makes anyway.  GradScaler keeps the
    decision private, hence ``_per_optimizer_states`` (torch 2.x).
    """
    from torch.amp.grad_scaler import OptState

    if not scaler.is_enabled():
        return False
    if scaler._per_optimizer_states[id(optimizer)]["stage"] is OptState.READY:
        scaler.unscale_(optimizer)
    found = scaler._per_optimizer_states[id(optimizer)]["found_inf_per_device"]
    return bool(sum(v.item() for v in found.values()))


class GradientSync:
    """One coalesced allreduce through ``Comm`` after backward (mpi, none, and the fallback for any backend).

    Why not overlap with backward: an MPI rank on a CPU node has no spare core to overlap onto, and
    nonblocking MPI progresses only inside MPI calls, so the reduction after backward is the path here.
    """

    def __init__(self, comm: Comm, model: nn.Module, optimizer: torch.optim.Optimizer, **_: Any) -> None:
        self.comm = comm
        self.model = model
        self.optimizer = optimizer
        self._synced = False
        self.broadcast_initial_state()

    def broadcast_initial_state(self) -> None:
        """Every rank starts from rank 0's parameters and buffers."""
        for tensor in self.model.state_dict().values():
            self.comm.broadcast_(tensor, root=0)

    @property
    def forward_model(self) -> nn.Module:
        return self.model

    def describe(self) -> str:
        if self.comm.size == 1:
            return "one process: gradients are not averaged"
        return f"gradients averaged after backward (one coalesced allreduce through {self.comm.name})"

    @contextlib.contextmanager
    def accumulate(self, last: bool) -> Iterator[None]:
        yield

    # Set by the paths whose gradient reduction starts inside backward (hooks): the name ``reducing``
    # gives the backward pass.
    reduced_during_backward: str | None = None

    def reducing(self, last: bool) -> contextlib.AbstractContextManager[None]:
        """Context of a backward pass: marks it as a gradient collective (``Comm.inside``) on paths
        whose allreduce runs inside backward, so a stall there is named; a no-op elsewhere.

        Why Horovod too: its hooks enqueue each gradient during backward, and an enqueue waits for
        the lock Horovod's background thread holds through a negotiation -- with a peer frozen, that
        negotiation never ends and the rank blocks in the middle of backward, not in ``synchronize``.
        """
        if not last or self.reduced_during_backward is None:
            return contextlib.nullcontext()
        return self.comm.inside("allreduce", self.reduced_during_backward)

    def synchronize(self) -> None:
        if self._synced or self.comm.size == 1:
            self._synced = True
            return
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        if grads:
            self.comm.allreduce_coalesced_(grads, name="megdet.gradients")
            torch._foreach_div_(grads, float(self.comm.size))
        self._synced = True

    def step(self, scaler: torch.amp.GradScaler | None = None) -> bool:
        """The optimizer step; False when a GradScaler found inf/NaN gradients and skipped it (the
        caller then undoes what the forward changed: BN running statistics)."""
        self.synchronize()
        applied = True
        with self._no_resync():
            if scaler is not None:
                applied = not scaler_will_skip(scaler, self.optimizer)
                scaler.step(self.optimizer)
                scaler.update()
            else:
                self.optimizer.step()
        self._synced = False
        return applied

    def _no_resync(self) -> contextlib.AbstractContextManager[None]:
        """Context in which ``optimizer.step`` must not reduce the gradients again."""
        return contextlib.nullcontext()

    def zero_grad(self) -> None:
        self.optimizer.zero_grad()  # set_to_none is the default (and Horovod takes no argument)
        self._synced = False

    def discard(self) -> None:
        """Drop this step's gradients (a skipped step): nothing is reduced that will not be used."""
        self.zero_grad()


class HorovodGradientSync(GradientSync):
    reduced_during_backward = "megdet.gradients (hvd.DistributedOptimizer hooks, during backward)"

    def __init__(
        self,
        comm: Comm,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        *,
        accum: int = 1,
        fp16_compression: bool = False,
    ) -> None:
        import horovod.torch as hvd

        # No hvd.broadcast_optimizer_state: every rank loads the optimizer state from the same
        # checkpoint file (after wrapping, since DistributedOptimizer re-creates the optimizer), and
        # on a fresh start there is none.  Its recipe would also take a dummy zero-gradient step that
        # applies weight decay to the initial weights.
        wrapped = hvd.DistributedOptimizer(
            optimizer,
            named_parameters=model.named_parameters(),
            compression=hvd.Compression.fp16 if fp16_compression else hvd.Compression.none,
            backward_passes_per_step=accum,
            op=hvd.Average,
        )
        super().__init__(comm, model, wrapped)

    def broadcast_initial_state(self) -> None:
        import horovod.torch as hvd

        hvd.broadcast_parameters(self.model.state_dict(), root_rank=0)

    def describe(self) -> str:
        return "gradients averaged during backward (hvd.DistributedOptimizer, tensor fusion)"

    def synchronize(self) -> None:
        if not self._synced:
            with self.comm.inside("allreduce", "megdet.gradients (hvd.DistributedOptimizer)"):
                self.optimizer.synchronize()
            self._synced = True

    def _no_resync(self) -> contextlib.AbstractContextManager[None]:
        return self.optimizer.skip_synchronize()

    def discard(self) -> None:
        # Reductions started during backward must finish before the optimizer may zero gradients.
        self.synchronize()
        self.zero_grad()


class DDPGradientSync(GradientSync):
    reduced_during_backward = "megdet.gradients (DDP buckets, during backward)"

    def __init__(self, comm: Comm, model: nn.Module, optimizer: torch.optim.Optimizer, **_: Any) -> None:
        from torch.nn.parallel import DistributedDataParallel

        device_ids = [model_device(model).index] if model_device(model).type == "cuda" else None
        # DDP broadcasts rank 0's parameters and buffers when it wraps the model.
        self.ddp = DistributedDataParallel(model, device_ids=device_ids, broadcast_buffers=False)
        super().__init__(comm, model, optimizer)

    def broadcast_initial_state(self) -> None:
        """Done by DistributedDataParallel's constructor."""

    @property
    def forward_model(self) -> nn.Module:
        return self.ddp

    def describe(self) -> str:
        return "gradients averaged during backward (DistributedDataParallel buckets)"

    @contextlib.contextmanager
    def accumulate(self, last: bool) -> Iterator[None]:
        with contextlib.nullcontext() if last else self.ddp.no_sync():
            yield

    def synchronize(self) -> None:  # DDP averaged during backward
        self._synced = True


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def make_gradient_sync(
    comm: Comm,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    *,
    accum: int = 1,
    fp16_compression: bool = False,
    mode: str = "auto",
) -> GradientSync:
    """The gradient path for ``mode`` (see module docstring and ``solver.grad_sync``).

    ``auto``: overlapped for Horovod (``DistributedOptimizer``) and torch (DDP), whose collectives
    progress on their own threads while backward runs; after backward for mpi, in place per tensor.
    MPI has no overlapped path here: nonblocking MPI progresses only inside MPI calls and a CPU rank
    has no idle core to overlap onto.  No committed benchmark compares the paths of one backend
    (``bench/results/train_step.json`` compares launchers, each on its ``auto`` path); set
    ``solver.grad_sync`` to measure another.
    """
    # Horovod's optimizer hooks (and broadcast_parameters) refuse non-contiguous, e.g. channels_last,
    # tensors outright; the coalesced path reduces them in place through a flat view.
    channels_last = any(p.dim() == 4 and not p.is_contiguous() for p in model.parameters())
    if mode == "auto":
        after = comm.name == "mpi" or (comm.name == "horovod" and channels_last)
        mode = "after_backward" if after else "overlap"
    if fp16_compression and (mode == "after_backward" or comm.name != "horovod") and comm.size > 1:
        raise CommError(
            "solver.fp16_compression needs Horovod's overlapped optimizer (horovodrun, "
            "solver.grad_sync=overlap, no channels_last)"
        )
    if mode == "overlap" and comm.name == "horovod" and channels_last and comm.size > 1:
        raise CommError(
            "solver.grad_sync=overlap cannot run a channels_last model on Horovod (its optimizer "
            "refuses non-contiguous gradients): use solver.grad_sync=auto or after_backward"
        )
    if mode == "overlap" and comm.size > 1:
        if comm.name == "horovod":
            return HorovodGradientSync(comm, model, optimizer, accum=accum, fp16_compression=fp16_compression)
        if comm.name == "torch":
            return DDPGradientSync(comm, model, optimizer)
    return GradientSync(comm, model, optimizer)
