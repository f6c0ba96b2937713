"""CGBN statistics over a torch.distributed process group of their own (``MEGDET_CGBN_COMM=nccl``).

Why: Horovod's allreduce (the default under horovodrun) is ``synchronize(allreduce_async_(...))``: the
host waits, per BN layer and pass, for Horovod's background cycle to negotiate and launch the op, and
the MPI transport copies through the host.  An NCCL collective issued through torch.distributed is
queued on the device stream and returns at once: no host wait at all per layer.  Gradients stay on the
training comm (Horovod, MPI or torch); only the statistics ride this group.

Set-up works under every launcher the project knows, because the rendezvous rides the training comm:
rank 0 opens a ``TCPStore`` on a free port and broadcasts ``(address, port)`` through the training
comm (Horovod, MPI or torch), so no MASTER_PORT has to be agreed out of band (horovodrun's ranks do
not share a parent process, so a port derived from the environment would differ between them).  The
address is ``MASTER_ADDR`` when the launcher set one, 127.0.0.1 when every rank is on one node, else
rank 0's host name.  Under torchrun the default group exists already: a ``new_group`` with the
statistics' backend over all ranks is all it takes.

Backends: ``nccl`` (CUDA tensors; the production choice) or ``gloo`` -- ``MEGDET_CGBN_COMM=torch-gloo``,
which stands in for NCCL on CPU (tests, CI) and carries CUDA tensors through host memory.
"""

from __future__ import annotations

import os
import socket
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from megdet_hpc.distributed.comm import Comm, CommError, Group
from megdet_hpc.distributed.torch_comm import init_default_group
from megdet_hpc.utils import env as settings


class TorchStatsComm(Comm):
    """A ``Comm`` over one torch.distributed process group, beside the training comm ``main``."""

    def __init__(self, main: Comm, backend: str) -> None:
        super().__init__(main.env)
        self.name = "nccl" if backend == "nccl" else f"torch-{backend}"
        self.backend = backend
        self._main = main
        self._owns_default = False
        timeout = timedelta(seconds=settings.comm_timeout_s())
        if not dist.is_initialized():
            store = self._rendezvous(main, timeout)
            init_default_group(backend, store=store, rank=main.rank, world_size=main.size, timeout=timeout)
            self._owns_default = True
            self.pg: Any = dist.group.WORLD
        else:  # torchrun: the training comm's default group exists; add one with this backend
            self.pg = dist.new_group(backend=backend, timeout=timeout)
        if self.rank != main.rank or self.size != main.size:
            raise CommError(
                f"MEGDET_CGBN_COMM={self.name}: group rank {self.rank}/{self.size} does not match the "
                f"training comm's {main.rank}/{main.size}"
            )

    @staticmethod
    def _rendezvous(main: Comm, timeout: timedelta) -> dist.TCPStore:
        """Rank 0 listens on a port the OS picks; everyone learns (address, port) from the training comm."""
        store = None
        where = None
        if main.rank == 0:
            store = dist.TCPStore(
                "0.0.0.0", 0, main.size, is_master=True, timeout=timeout, wait_for_workers=False
            )
            host = os.environ.get("MASTER_ADDR") or (
                "127.0.0.1" if main.env.local_size >= main.size else socket.gethostname()
            )
            where = (host, store.port)
        host, port = main.broadcast_object(where, root=0)
        if store is None:
            store = dist.TCPStore(host, port, main.size, is_master=False, timeout=timeout)
        return store

    @property
    def rank(self) -> int:
        return dist.get_rank(self.pg)

    @property
    def size(self) -> int:
        return dist.get_world_size(self.pg)

    @property
    def device(self) -> torch.device:
        if self.backend == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    def _allreduce_(self, tensor: torch.Tensor, group: Group | None, name: str | None = None) -> torch.Tensor:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=group.handle if group else self.pg)
        return tensor

    def _broadcast_(self, tensor: torch.Tensor, root: int) -> torch.Tensor:
        dist.broadcast(tensor, src=root, group=self.pg)
        return tensor

    def _allgather_object(self, obj: Any) -> list[Any]:
        return self._main.allgather_object(obj)  # objects are the training comm's business

    def _broadcast_object(self, obj: Any, root: int) -> Any:
        return self._main.broadcast_object(obj, root)

    def _barrier(self) -> None:
        dist.barrier(group=self.pg)

    def _new_group(self, ranks: tuple[int, ...]) -> Any:
        # Collective over the default group, like every torch new_group: the BN groups.
        return dist.new_group(list(ranks), backend=self.backend)

    def shutdown(self) -> None:
        if self._owns_default and dist.is_initialized():
            dist.destroy_process_group()
            self._owns_default = False
        self.pg = None  # the last handle: the group's threads end with it
