"""The one communication abstraction every distributed call in megdet_hpc goes through.

Why one layer: CGBN, gradient averaging, checkpoint coordination, evaluation gathering and the
preemption vote all need collectives, and the right transport differs by launcher (horovodrun, mpirun,
srun, torchrun) and by device.  ``Comm`` offers the few primitives the project needs (in-place sum
allreduce over an optional group, broadcast, object allgather/broadcast, barrier, groups) and counts
every collective it issues, so tests and benchmarks can prove how many collectives and elements a code
path really sends (``Comm.counters``).  It also records the collective this rank is inside right now
(``Comm.waiting``), so the stall watchdog can say where a rank hangs when a peer is frozen or gone.

Backends (``MEGDET_COMM=auto|horovod|torch|mpi|none``):
  * ``horovod`` -- hvd.allreduce_ on CPU (gloo/MPI) or GPU (NCCL); groups are Horovod process sets.
  * ``torch``   -- torch.distributed (gloo on CPU, nccl on GPU); groups are ``new_group``.
  * ``mpi``     -- mpi4py on numpy views of CPU tensors (no copy); groups are ``Comm.Split``.
  * ``none``    -- a single process; every collective is the identity.

CGBN statistics may ride a different transport than the gradients (``MEGDET_CGBN_COMM``, see
``stats_comm``): the training comm, mpi4py, or a torch.distributed NCCL (gloo on CPU) group of their own.
"""

from __future__ import annotations

import contextlib
import gc
import sys
import traceback
from abc import ABC, abstractmethod
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch

from megdet_hpc.launch.environment import ClusterEnvironment, detect
from megdet_hpc.utils import env as settings
from megdet_hpc.utils.errors import UserError

BACKENDS = settings.COMM_BACKENDS
T = TypeVar("T")


class CommError(UserError, RuntimeError):
    """A distributed set-up problem the user can fix (bad group size, missing backend, ...)."""


@dataclass(frozen=True)
class Group:
    """A set of ranks that reduce together (a BN group).  ``handle`` is the backend's own object."""

    ranks: tuple[int, ...]
    rank: int  # this process's index inside ``ranks``
    handle: Any = None

    @property
    def size(self) -> int:
        return len(self.ranks)


@dataclass
class CommCounters:
    """Collectives issued by this process: calls and elements per operation name."""

    calls: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    elements: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    log: list[tuple[str, int, str]] = field(default_factory=list)
    keep_log: bool = False

    def add(self, op: str, numel: int, dtype: str = "") -> None:
        self.calls[op] += 1
        self.elements[op] += numel
        if self.keep_log:
            self.log.append((op, numel, dtype))

    def reset(self, keep_log: bool = False) -> None:
        self.calls.clear()
        self.elements.clear()
        self.log.clear()
        self.keep_log = keep_log


class Comm(ABC):
    """Backend-neutral collectives.  Subclasses implement the underscore methods."""

    name: str = "abstract"

    def __init__(self, env: ClusterEnvironment) -> None:
        self.env = env
        self.counters = CommCounters()
        self._groups: dict[int, Group] = {}
        self._name_counts: dict[str, int] = defaultdict(int)
        self.waiting: str | None = None  # the collective this rank is inside ("allreduce megdet.vote")

    @contextlib.contextmanager
    def inside(self, op: str, name: str | None = None) -> Iterator[None]:
        """Mark the block as waiting in collective ``op`` (``name``: its stable name).

        Why: a TCP or MPI collective whose peer is frozen or unreachable blocks without a word; the
        stall watchdog (``engine.watchdog``) reads ``waiting`` from its own thread to name the
        collective in its one-line report.  Nested marks (a CGBN collective inside DDP's backward)
        name the innermost one and restore the outer one on exit.
        """
        outer = self.waiting
        self.waiting = f"{op} {name}" if name else op
        try:
            yield
        finally:
            self.waiting = outer

    # -- topology -------------------------------------------------------------------------------
    @property
    @abstractmethod
    def rank(self) -> int: ...

    @property
    @abstractmethod
    def size(self) -> int: ...

    @property
    def local_rank(self) -> int:
        return self.env.local_rank

    @property
    def local_size(self) -> int:
        return self.env.local_size

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def device(self) -> torch.device:
        """Where small tensors built on the host (the per-step vote) must be to be reduced: the CPU,
        except for transports that only carry device memory (NCCL)."""
        return torch.device("cpu")

    # -- collectives (counted) ------------------------------------------------------------------
    def allreduce_(
        self, tensor: torch.Tensor, group: Group | None = None, name: str | None = None
    ) -> torch.Tensor:
        """Sum ``tensor`` in place over ``group`` (all ranks when None); returns ``tensor``.

        ``name``: a stable name for a collective issued every step (Horovod matches ranks' requests by
        name and caches responses by it; unnamed ops get a fresh name per call, which fills Horovod's
        response cache and logs eviction warnings).  Every rank must pass the same name.
        """
        self.counters.add("allreduce", tensor.numel(), str(tensor.dtype))
        if (group.size if group is not None else self.size) == 1:
            return tensor
        with self.inside("allreduce", name):
            return self._allreduce_(tensor, group, name)

    def allreduce_coalesced_(
        self, tensors: Sequence[torch.Tensor], group: Group | None = None, name: str | None = None
    ) -> None:
        """Sum every tensor of ``tensors`` in place: one logical collective (the gradient allreduce).

        Counted once, as an ``allreduce`` of the total element count, whatever the backend does
        underneath: Horovod fuses the list (``grouped_allreduce_``), MPI reduces each tensor in place
        (no flatten/unflatten copies), gloo/nccl get one flattened buffer per dtype.
        """
        tensors = list(tensors)
        self.counters.add(
            "allreduce", sum(t.numel() for t in tensors), str(tensors[0].dtype) if tensors else ""
        )
        if tensors and (group.size if group is not None else self.size) > 1:
            with self.inside("allreduce", name):
                self._allreduce_coalesced_(tensors, group, name)

    def broadcast_(self, tensor: torch.Tensor, root: int = 0) -> torch.Tensor:
        self.counters.add("broadcast", tensor.numel(), str(tensor.dtype))
        if self.size == 1:
            return tensor
        with self.inside("broadcast"):
            return self._broadcast_(tensor, root)

    def allgather_object(self, obj: Any) -> list[Any]:
        self.counters.add("allgather_object", 1)
        if self.size == 1:
            return [obj]
        with self.inside("allgather_object"):
            return self._allgather_object(obj)

    def broadcast_object(self, obj: Any, root: int = 0) -> Any:
        self.counters.add("broadcast_object", 1)
        if self.size == 1:
            return obj
        with self.inside("broadcast_object"):
            return self._broadcast_object(obj, root)

    def barrier(self) -> None:
        self.counters.add("barrier", 0)
        if self.size > 1:
            with self.inside("barrier"):
                self._barrier()

    def unique_name(self, prefix: str) -> str:
        """``prefix.K`` with K counting calls per prefix: identical on every rank that makes the same
        calls in the same order (how layers name their per-step collectives)."""
        self._name_counts[prefix] += 1
        return f"{prefix}.{self._name_counts[prefix]}"

    def contiguous_group(self, group_size: int | None) -> Group | None:
        """This rank's group of ``group_size`` contiguous ranks (MegDet's BN groups).

        ``None``/0 or the world size means all ranks (returns None = the world).  Every rank must
        call this with the same value: each backend creates every group collectively.
        """
        world = self.size
        if not group_size or group_size == world:
            return None
        if group_size < 0 or world % group_size != 0:
            raise CommError(f"BN group_size={group_size} must divide the world size {world}")
        if group_size in self._groups:
            return self._groups[group_size]
        mine = None
        for start in range(0, world, group_size):
            ranks = tuple(range(start, start + group_size))
            handle = self._new_group(ranks) if group_size > 1 else None
            if self.rank in ranks:
                mine = Group(ranks, ranks.index(self.rank), handle)
        assert mine is not None
        self._groups[group_size] = mine
        return mine

    def shutdown(self) -> None:  # noqa: B027 - optional hook: most backends hold nothing to release
        """Release backend resources (idempotent)."""

    # -- backend hooks --------------------------------------------------------------------------
    @abstractmethod
    def _allreduce_(self, tensor: torch.Tensor, group: Group | None, name: str | None) -> torch.Tensor: ...

    def _allreduce_coalesced_(
        self, tensors: list[torch.Tensor], group: Group | None, name: str | None
    ) -> None:
        """Default: one flattened buffer per dtype, so transports that favour big messages get one."""
        by_dtype: dict[torch.dtype, list[torch.Tensor]] = defaultdict(list)
        for t in tensors:
            by_dtype[t.dtype].append(t)
        for same in by_dtype.values():
            flat = self._allreduce_(torch.cat([t.reshape(-1) for t in same]), group, name)
            for t, part in zip(same, flat.split([t.numel() for t in same])):
                t.copy_(part.view_as(t))

    @abstractmethod
    def _broadcast_(self, tensor: torch.Tensor, root: int) -> torch.Tensor: ...

    @abstractmethod
    def _allgather_object(self, obj: Any) -> list[Any]: ...

    @abstractmethod
    def _broadcast_object(self, obj: Any, root: int) -> Any: ...

    @abstractmethod
    def _barrier(self) -> None: ...

    @abstractmethod
    def _new_group(self, ranks: tuple[int, ...]) -> Any: ...


_COMM: Comm | None = None
_STATS_COMM: Comm | None = None


def resolve_backend(requested: str, env: ClusterEnvironment) -> str:
    """Pick a concrete backend name for ``requested`` (``auto`` follows the launcher)."""
    if requested not in BACKENDS:
        raise CommError(f"MEGDET_COMM={requested!r} is not one of {', '.join(BACKENDS)}")
    if requested != "auto":
        return requested
    if env.size == 1:
        return "none"
    if env.name == "torchrun":
        return "torch"
    if env.name == "horovodrun-gloo" or env.is_mpi:
        if _importable("horovod.torch"):
            return "horovod"
        return "mpi" if env.is_mpi else "torch"
    return "torch"


def _importable(module: str) -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False


def init(backend: str | None = None, device: str | None = None) -> Comm:
    """Initialise (once) and return the process-wide ``Comm``.

    ``device``: the training device type (``cpu``/``cuda``; None: CUDA when visible).  torch.distributed
    picks its backend from it -- a CPU run on a GPU node must not get NCCL."""
    global _COMM
    if _COMM is not None:
        return _COMM
    check_environment()  # a bad MEGDET_* value fails here, not at the first collective
    env = detect()
    name = resolve_backend(backend or settings.comm_backend(), env)
    _COMM = make_comm(name, env, device)
    return _COMM


def make_comm(name: str, env: ClusterEnvironment, device: str | None = None) -> Comm:
    """Construct a backend by name (no global state): also used for the CGBN statistics comm."""
    if name == "none":
        from megdet_hpc.distributed.single import SingleProcessComm

        return SingleProcessComm(env)
    if name == "horovod":
        from megdet_hpc.distributed.horovod_comm import HorovodComm

        return HorovodComm(env)
    if name == "torch":
        from megdet_hpc.distributed.torch_comm import TorchComm

        return TorchComm(env, device)
    if name == "mpi":
        from megdet_hpc.distributed.mpi_comm import MPIComm

        return MPIComm(env)
    raise CommError(f"unknown comm backend {name!r}")


def get() -> Comm:
    """The process-wide ``Comm``; initialises it from the environment on first use."""
    return _COMM if _COMM is not None else init()


STATS_MODES = settings.CGBN_TRANSPORTS


def check_environment() -> None:
    """Every ``MEGDET_*`` variable validated (``utils.env``): a ``CommError`` naming the first bad one."""
    try:
        settings.check_all()
    except settings.EnvError as exc:
        raise CommError(str(exc)) from exc


def stats_mode() -> str:
    """``MEGDET_CGBN_COMM`` validated (one-line error for anything else)."""
    try:
        return settings.cgbn_comm()
    except settings.EnvError as exc:
        raise CommError(str(exc)) from exc


def stats_comm() -> Comm:
    """The transport for CGBN statistics (``MEGDET_CGBN_COMM``, default ``main``); gradients always stay
    on the training comm.  The README's table "CGBN statistics transport" says which to pick.

    * ``main`` -- the training comm: Horovod under horovodrun (MegDet's design), torch.distributed
      under torchrun, mpi4py under mpirun with ``MEGDET_COMM=mpi``.
    * ``mpi`` -- mpi4py over the same MPI world.  ``bench/cgbn.py`` chose ``main`` as the default
      (``bench/results/cgbn.json``): an isolated 2C+1 allreduce is far cheaper through mpi4py than
      through Horovod, but inside the BN loop of a Horovod-MPI job the mpi4py route was slower
      (OpenMPI's THREAD_MULTIPLE lock contends with Horovod's background thread).
    * ``nccl`` -- a torch.distributed NCCL group of its own (``stats_group.py``), under any launcher:
      collectives queued on the device stream, no host wait per layer.  CUDA only.
    * ``torch-gloo`` -- the same group with gloo: NCCL's stand-in on CPU (tests, CI).
    """

    global _STATS_COMM
    if _STATS_COMM is not None:
        return _STATS_COMM
    mode = stats_mode()
    main = get()
    if main.size == 1 or mode == "main":
        _STATS_COMM = main
    elif mode == "mpi":
        if main.name == "mpi":
            _STATS_COMM = main
            return _STATS_COMM
        if not (main.env.is_mpi and _importable("mpi4py")):
            raise CommError(
                "MEGDET_CGBN_COMM=mpi needs an MPI launch (mpirun, horovodrun --mpi, srun --mpi=pmix)"
            )
        from megdet_hpc.distributed.mpi_comm import MPIComm

        _STATS_COMM = MPIComm(main.env, other_mpi_threads=main.name == "horovod")
        if _STATS_COMM.size != main.size or _STATS_COMM.rank != main.rank:
            raise CommError(
                f"MEGDET_CGBN_COMM=mpi: the MPI world (rank {_STATS_COMM.rank}/{_STATS_COMM.size}) "
                f"does not match the training comm ({main.rank}/{main.size}); launch with mpirun/srun"
            )
    else:
        if mode == "nccl" and not torch.cuda.is_available():
            raise CommError("MEGDET_CGBN_COMM=nccl needs CUDA (on CPU, torch-gloo stands in for it)")
        from megdet_hpc.distributed.stats_group import TorchStatsComm

        _STATS_COMM = TorchStatsComm(main, "nccl" if mode == "nccl" else "gloo")
    return _STATS_COMM


def active_comms() -> list[Comm]:
    """The comms live in this process (training, and CGBN statistics when separate): where the stall
    watchdog looks for the collective a rank is waiting in."""
    comms = [c for c in (_COMM, _STATS_COMM) if c is not None]
    return [c for i, c in enumerate(comms) if c not in comms[:i]]


def shutdown() -> None:
    """Shut down the statistics comm (if separate) and the main comm.

    Why the collection first: ``destroy_process_group`` only unregisters a torch process group; its
    threads (gloo's runloops, holding the last collective's work and its tensors) end when the last
    Python handle on it dies.  A group the model still holds (DDP, the CGBN layers' BN groups) lives
    on into interpreter finalisation, where a runloop that drops a tensor with a Python owner takes the
    GIL from a finalising interpreter and aborts the process ("terminate called without an active
    exception", SIGABRT instead of the job's exit code; pytorch/pytorch#179291).  So the callers drop
    their objects before they call this (``run_with_comm``: they live in the body's frame), a
    failure's traceback -- which keeps its frames and their locals alive -- is cleared here, and
    cyclic garbage (a training run's objects form cycles) is collected, before any group is destroyed.
    """
    global _COMM, _STATS_COMM
    failure = sys.exc_info()[1]
    if failure is not None:
        traceback.clear_frames(failure.__traceback__)
    gc.collect()
    if _STATS_COMM is not None and _STATS_COMM is not _COMM:
        _STATS_COMM.shutdown()
    if _COMM is not None:
        _COMM.shutdown()
    _COMM = _STATS_COMM = None


def run_with_comm(body: Callable[[Comm], T], backend: str | None = None, device: str | None = None) -> T:
    """``body(init(backend, device))``, then ``shutdown()`` -- the way every entry point runs.

    Why a function: whatever ``body`` builds (the model, DDP, the CGBN layers' groups) lives in its
    frame, which is gone -- or, on a failure, cleared by ``shutdown`` -- before any process group is
    destroyed, so no group outlives the interpreter (see ``shutdown``).
    """
    comm = init(backend, device)
    try:
        return body(comm)
    finally:
        shutdown()


def flat_view(tensor: torch.Tensor) -> torch.Tensor | None:
    """A 1-D view over ``tensor``'s memory when it is one dense block, else None.

    Why: collectives want contiguous buffers, and channels_last tensors (activations, gradients of a
    channels_last model) are not ``is_contiguous()`` yet occupy one dense block of storage.  An
    element-wise sum over that block is layout-independent (every rank has the same layout), so it is
    reduced in place instead of through a contiguous copy and back.
    """
    t = tensor.detach()
    if t.is_contiguous():
        return t.view(-1)
    if t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last):
        return t.as_strided((t.numel(),), (1,))
    return None


@contextlib.contextmanager
def dense_buffers(tensors: Sequence[torch.Tensor]) -> Iterator[list[torch.Tensor]]:
    """Buffers a transport that wants contiguous memory can work on in place: ``flat_view`` of each
    dense tensor, a contiguous copy of any other (written back into it on exit)."""
    views = [flat_view(t) for t in tensors]
    staged = [v if v is not None else t.contiguous() for t, v in zip(tensors, views)]
    yield staged
    for t, v, s in zip(tensors, views, staged):
        if v is None:
            t.copy_(s)
