"""The ``mpi`` backend: mpi4py on numpy views of CPU tensors.

Why: small allreduces through raw MPI cost microseconds on shared memory, where Horovod and gloo
cost milliseconds (Horovod's background-thread cycle, gloo's TCP).  CGBN issues two tiny collectives
per BN layer per step, so this is the latency-optimal transport for its statistics on CPU.  CPU
tensors are reduced in place through ``Tensor.numpy()`` (shared memory, no copy); CUDA tensors and
dtypes numpy lacks (bfloat16) go through a host copy.  The communicator is a ``Dup`` of COMM_WORLD so
it never interleaves with messages of another library (Horovod's MPI controller) in the same world.

Threads.  On CUDA, autograd runs a backward pass on its per-device worker thread, so the CGBN
backward's allreduce is an MPI call from a thread that did not initialise MPI; on CPU it runs on the
calling thread.  What MPI must provide (``MPI.Query_thread()``; mpi4py requests ``MPI4PY_RC_THREAD_LEVEL``,
default ``multiple``; Horovod-MPI requests MULTIPLE unless ``HOROVOD_MPI_THREADS_DISABLE=1``):
  * CPU, mpi4py the only MPI user: FUNNELED (every call on the main thread);
  * CUDA, mpi4py the only MPI user (``MEGDET_COMM=mpi``): SERIALIZED -- the main thread is blocked in
    ``backward()`` while the device thread calls MPI, and nothing else calls MPI meanwhile;
  * alongside Horovod's MPI background thread (``MEGDET_CGBN_COMM=mpi`` under horovodrun --mpi):
    MULTIPLE, on any device -- Horovod calls MPI concurrently from its own thread.
``MPIComm`` checks this at start-up and refuses a level below it with a one-line error.
"""

from __future__ import annotations

from typing import Any

import torch

from megdet_hpc.distributed.comm import Comm, CommError, Group, flat_view
from megdet_hpc.launch.environment import ClusterEnvironment
from megdet_hpc.launch.slurm import separate_mpi_shared_memory

THREAD_LEVELS = ("single", "funneled", "serialized", "multiple")  # MPI.THREAD_SINGLE == 0 .. 3


def required_thread_level(cuda: bool, other_mpi_threads: bool) -> int:
    """The MPI thread level mpi4py needs here (module docstring): index into ``THREAD_LEVELS``."""
    if other_mpi_threads:
        return 3
    return 2 if cuda else 1


class MPIComm(Comm):
    name = "mpi"

    def __init__(self, env: ClusterEnvironment, other_mpi_threads: bool = False) -> None:
        """``other_mpi_threads``: another library's thread calls MPI in this process (Horovod-MPI)."""
        super().__init__(env)
        separate_mpi_shared_memory()  # before MPI_Init: not the killed run's segments
        from mpi4py import MPI

        self.MPI = MPI
        self.thread_level = THREAD_LEVELS[MPI.Query_thread()]
        need = required_thread_level(torch.cuda.is_available(), other_mpi_threads)
        if THREAD_LEVELS.index(self.thread_level) < need:
            raise CommError(
                f"MPI provides thread level {self.thread_level}, mpi4py here needs {THREAD_LEVELS[need]} "
                "(CUDA backward calls MPI from autograd's device thread; Horovod's thread calls it too): "
                "unset MPI4PY_RC_THREAD_LEVEL / HOROVOD_MPI_THREADS_DISABLE"
            )
        self.mpi_comm = MPI.COMM_WORLD.Dup()

    @property
    def rank(self) -> int:
        return self.mpi_comm.Get_rank()

    @property
    def size(self) -> int:
        return self.mpi_comm.Get_size()

    def _allreduce_(self, tensor: torch.Tensor, group: Group | None, name: str | None = None) -> torch.Tensor:
        mpi_comm = group.handle if group is not None else self.mpi_comm
        dense = flat_view(tensor) if tensor.device.type == "cpu" and tensor.dtype != torch.bfloat16 else None
        if dense is not None:
            mpi_comm.Allreduce(self.MPI.IN_PLACE, dense.numpy(), op=self.MPI.SUM)
            return tensor
        host = tensor.detach().to("cpu", torch.float32 if tensor.dtype == torch.bfloat16 else None)
        host = host.contiguous()
        mpi_comm.Allreduce(self.MPI.IN_PLACE, host.numpy(), op=self.MPI.SUM)
        tensor.copy_(host)
        return tensor

    def _allreduce_coalesced_(
        self, tensors: list[torch.Tensor], group: Group | None, name: str | None
    ) -> None:
        """Each tensor in place, no flattening.

        Why: on shared memory the reduction is a memory copy too, so packing into one flat buffer and
        unpacking again triples the memory traffic, while MPI latency is microseconds per call (no
        committed benchmark compares the two).
        """
        for t in tensors:
            self._allreduce_(t, group)

    def _broadcast_(self, tensor: torch.Tensor, root: int) -> torch.Tensor:
        host = tensor.detach().cpu().contiguous()
        if host.dtype == torch.bfloat16:
            host = host.float()
        self.mpi_comm.Bcast(host.numpy(), root=root)
        if host.data_ptr() != tensor.data_ptr():
            tensor.copy_(host)
        return tensor

    def _allgather_object(self, obj: Any) -> list[Any]:
        return self.mpi_comm.allgather(obj)

    def _broadcast_object(self, obj: Any, root: int) -> Any:
        return self.mpi_comm.bcast(obj, root=root)

    def _barrier(self) -> None:
        self.mpi_comm.Barrier()

    def _new_group(self, ranks: tuple[int, ...]) -> Any:
        # Split is collective over the whole communicator: every rank passes the colour of the group
        # being created, ranks outside it pass UNDEFINED and receive COMM_NULL.
        color = 0 if self.rank in ranks else self.MPI.UNDEFINED
        sub = self.mpi_comm.Split(color, key=self.rank)
        return sub if sub != self.MPI.COMM_NULL else None

    def shutdown(self) -> None:
        # The duplicated communicator is deliberately not freed: MPI_Comm_free while Horovod's MPI
        # background thread is alive segfaults in OpenMPI 4.1 (attribute cleanup); MPI_Finalize
        # releases it anyway.
        return None
