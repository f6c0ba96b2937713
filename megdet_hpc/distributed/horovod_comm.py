"""The ``horovod`` backend: Horovod collectives (gloo or MPI on CPU, NCCL on GPU).

Groups are Horovod *dynamic* process sets (``HOROVOD_DYNAMIC_PROCESS_SETS=1`` is set before
``hvd.init``), so BN groups can be created after start-up like ``torch.distributed.new_group``.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from megdet_hpc.distributed.comm import Comm, CommError, Group, dense_buffers
from megdet_hpc.launch.environment import ClusterEnvironment
from megdet_hpc.launch.slurm import separate_mpi_shared_memory


class HorovodComm(Comm):
    name = "horovod"

    def __init__(self, env: ClusterEnvironment) -> None:
        super().__init__(env)
        os.environ.setdefault("HOROVOD_DYNAMIC_PROCESS_SETS", "1")
        separate_mpi_shared_memory()  # before hvd.init's MPI_Init: not the killed run's segments
        if torch.cuda.is_available():
            # Horovod 0.28's GPU completion mode: without it the finalizer thread waits on the host for
            # the NCCL kernels before marking an op done, so every hvd.allreduce_ (=synchronize) of a
            # CGBN layer blocks until the GPU has reached that layer and finished NCCL.  With it, the
            # torch stream waits on Horovod's event instead (horovod/common/ops/gpu_operations.cc,
            # FinalizeGPUQueue; horovod/torch/mpi_ops_v2.cc, DoAllreduce): the host then waits only for
            # Horovod's negotiation cycle (HOROVOD_CYCLE_TIME) and the launch.  Data readiness is
            # already device-side (NCCLAllreduce::WaitForData: gpuStreamWaitEvent).
            os.environ.setdefault("HOROVOD_ENABLE_ASYNC_COMPLETION", "1")
        else:
            # Read by MPI_Init inside hvd.init().  On a CPU node the ranks' compute threads own every
            # core and Horovod's background thread busy-polls inside MPI while it waits for the other
            # ranks: polling threads then wait for scheduler time slices, and yielding lets the rank
            # that is behind run (no committed benchmark measures the difference).  GPU nodes have
            # spare cores and keep OpenMPI's lower-latency busy polling.
            os.environ.setdefault("OMPI_MCA_mpi_yield_when_idle", "1")
        try:
            import horovod.torch as hvd
        except ImportError as exc:  # pragma: no cover - depends on the install
            raise CommError(f"MEGDET_COMM=horovod but horovod.torch cannot be imported: {exc}") from exc
        self.hvd = hvd
        hvd.init()
        self._process_sets: list[Any] = []
        self._closed = False

    @property
    def rank(self) -> int:
        return self.hvd.rank()

    @property
    def size(self) -> int:
        return self.hvd.size()

    @property
    def local_rank(self) -> int:
        return self.hvd.local_rank()

    @property
    def local_size(self) -> int:
        return self.hvd.local_size()

    def _allreduce_(self, tensor: torch.Tensor, group: Group | None, name: str | None = None) -> torch.Tensor:
        if not tensor.is_contiguous():
            self._allreduce_coalesced_([tensor], group, name)
            return tensor
        kwargs = {"process_set": group.handle} if group is not None else {}
        return self.hvd.allreduce_(tensor, op=self.hvd.Sum, name=name, **kwargs)

    def _allreduce_coalesced_(
        self, tensors: list[torch.Tensor], group: Group | None, name: str | None
    ) -> None:
        # Horovod refuses non-contiguous tensors: reduce dense (e.g. channels_last) ones through a flat
        # view of their memory and the rest through a contiguous copy.
        kwargs = {"process_set": group.handle} if group is not None else {}
        with dense_buffers(tensors) as staged:
            self.hvd.grouped_allreduce_(staged, op=self.hvd.Sum, name=name, **kwargs)

    def _broadcast_(self, tensor: torch.Tensor, root: int) -> torch.Tensor:
        with dense_buffers([tensor]) as (staged,):
            self.hvd.broadcast_(staged, root_rank=root)
        return tensor

    def _allgather_object(self, obj: Any) -> list[Any]:
        return self.hvd.allgather_object(obj, name="megdet.allgather_object")

    def _broadcast_object(self, obj: Any, root: int) -> Any:
        # Horovod names the op after type(obj) by default, which differs between the root and the
        # receivers (dict vs NoneType) and deadlocks: give every call the same explicit name.
        return self.hvd.broadcast_object(obj, root_rank=root, name="megdet.broadcast_object")

    def _barrier(self) -> None:
        self.hvd.barrier()

    def _new_group(self, ranks: tuple[int, ...]) -> Any:
        ps = self.hvd.add_process_set(list(ranks))
        self._process_sets.append(ps)
        return ps

    def shutdown(self) -> None:
        if self._closed:
            return
        self._closed = True
        # Horovod can hang in shutdown while a peer is still using a process set: meet first.
        if self._process_sets:
            self.hvd.barrier()
        self.hvd.shutdown()
