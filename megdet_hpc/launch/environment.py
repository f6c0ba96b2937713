"""Which launcher started this process, and where this process sits in the job.

One table per launcher environment (``launch.names.ENVIRONMENTS``), in the shape of submitit's
``JobEnvironment._env``: how to recognise it, which environment variables hold rank, world size, local
rank and local size, and how to find the master address (rank 0's host, for torch.distributed's
rendezvous).  ``detect`` walks the tables in order -- horovodrun (gloo) sets its own variables, mpirun
/ horovodrun --mpi set OMPI_*/PMI_*, torchrun sets RANK/WORLD_SIZE, submitit's local executor
SUBMITIT_LOCAL_*, srun SLURM_* (and PMIX_* with --mpi=pmix) -- and returns a frozen
``ClusterEnvironment``.  The comm layer uses it to pick a backend (``MEGDET_COMM=auto``) and
torch.distributed to rendezvous; the Slurm specifics (requeue, node list) live in ``launch/slurm.py``.
"""

from __future__ import annotations

import os
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from megdet_hpc.launch import names
from megdet_hpc.launch.slurm import master_addr as slurm_master_addr

LOOPBACK = "127.0.0.1"


def loopback(env: Mapping[str, str]) -> str:
    """Every rank on this host (horovodrun, mpirun and submitit's local executor as launched here)."""
    return LOOPBACK


@dataclass(frozen=True)
class ClusterEnvironment:
    """Position of this process in the job as reported by its launcher."""

    name: str
    rank: int
    size: int
    local_rank: int
    local_size: int
    is_mpi: bool = False  # the processes share an MPI world (mpi4py and Horovod-MPI can initialise)
    find_master: Callable[[Mapping[str, str]], str] = field(default=loopback, compare=False, repr=False)

    def master_addr(self, env: Mapping[str, str] | None = None) -> str:
        """Rank 0's host as this launcher tells it (``MASTER_ADDR`` in ``env`` wins)."""
        env = os.environ if env is None else env
        return env.get("MASTER_ADDR") or self.find_master(env)


@dataclass(frozen=True)
class EnvironmentTable:
    """How one launcher describes the job: a recogniser, the variables of each field (first set wins)
    and how to find the master address."""

    name: str
    recognise: Callable[[Mapping[str, str]], bool]
    variables: dict[str, tuple[str, ...]]
    defaults: dict[str, int] = field(default_factory=lambda: {"local_rank": 0, "local_size": 1})
    is_mpi: bool = False
    master_addr: Callable[[Mapping[str, str]], str] = loopback

    def read(self, env: Mapping[str, str]) -> ClusterEnvironment:
        values = {key: _int(env, keys, self.defaults.get(key)) for key, keys in self.variables.items()}
        return ClusterEnvironment(self.name, is_mpi=self.is_mpi, find_master=self.master_addr, **values)


def _int(env: Mapping[str, str], keys: tuple[str, ...], default: int | None) -> int:
    for key in keys:
        value = env.get(key, "")
        if value.isdigit():
            return int(value)
    if default is None:
        raise KeyError(f"none of {', '.join(keys)} is set")
    return default


def _slurm_multi_task(env: Mapping[str, str]) -> bool:
    # The batch script itself (no job step) is not a rank of a multi-task job.
    return "SLURM_PROCID" in env and "SLURM_STEP_ID" in env and _int(env, ("SLURM_NTASKS",), 1) > 1


_SLURM = {
    "rank": ("SLURM_PROCID",),
    "size": ("SLURM_NTASKS",),
    "local_rank": ("SLURM_LOCALID",),
    "local_size": ("SLURM_NTASKS_PER_NODE",),
}

TABLES: tuple[EnvironmentTable, ...] = (
    EnvironmentTable(
        names.HVD_GLOO,
        lambda e: "HOROVOD_RANK" in e and "HOROVOD_GLOO_RENDEZVOUS_ADDR" in e,
        {
            "rank": ("HOROVOD_RANK",),
            "size": ("HOROVOD_SIZE",),
            "local_rank": ("HOROVOD_LOCAL_RANK",),
            "local_size": ("HOROVOD_LOCAL_SIZE",),
        },
    ),
    EnvironmentTable(
        names.MPIRUN,
        lambda e: "OMPI_COMM_WORLD_RANK" in e or "PMI_RANK" in e,
        {
            "rank": ("OMPI_COMM_WORLD_RANK", "PMI_RANK"),
            "size": ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE"),
            "local_rank": ("OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID"),
            "local_size": ("OMPI_COMM_WORLD_LOCAL_SIZE", "MPI_LOCALNRANKS"),
        },
        is_mpi=True,
    ),
    EnvironmentTable(
        names.TORCHRUN,
        lambda e: "TORCHELASTIC_RUN_ID" in e or ("RANK" in e and "WORLD_SIZE" in e and "MASTER_ADDR" in e),
        {
            "rank": ("RANK",),
            "size": ("WORLD_SIZE",),
            "local_rank": ("LOCAL_RANK",),
            "local_size": ("LOCAL_WORLD_SIZE",),
        },
    ),
    EnvironmentTable(
        names.SUBMITIT_LOCAL,
        lambda e: "SUBMITIT_LOCAL_GLOBALID" in e and _int(e, ("SUBMITIT_LOCAL_NTASKS",), 1) > 1,
        {
            "rank": ("SUBMITIT_LOCAL_GLOBALID",),
            "size": ("SUBMITIT_LOCAL_NTASKS",),
            "local_rank": ("SUBMITIT_LOCAL_LOCALID",),
            "local_size": ("SUBMITIT_LOCAL_NTASKS",),
        },
    ),
    # Tasks on several nodes: rank 0 runs on the first host of the step's node list.
    EnvironmentTable(
        names.SRUN_PMIX,
        lambda e: _slurm_multi_task(e) and "PMIX_RANK" in e,
        _SLURM,
        is_mpi=True,
        master_addr=slurm_master_addr,
    ),
    EnvironmentTable(names.SRUN, _slurm_multi_task, _SLURM, master_addr=slurm_master_addr),
)
LOCAL = ClusterEnvironment(names.LOCAL, 0, 1, 0, 1)


def detect(env: Mapping[str, str] | None = None) -> ClusterEnvironment:
    """The launcher of this process (a pure function of ``env``, default ``os.environ``)."""
    env = os.environ if env is None else env
    for table in TABLES:
        if table.recognise(env):
            return table.read(env)
    return LOCAL


def job_port(env: Mapping[str, str]) -> int:
    """A rendezvous port derived from the job id: stable across requeues, distinct between jobs."""
    if env.get("MASTER_PORT", "").isdigit():
        return int(env["MASTER_PORT"])
    seed = (
        env.get("SLURM_JOB_ID")
        or env.get("SUBMITIT_LOCAL_JOB_ID")
        or env.get("OMPI_MCA_orte_hnp_uri")
        or str(os.getppid())
    )
    return 20000 + zlib.crc32(seed.encode()) % 30000
