"""Which launcher started this process, and where this process sits in the job.

One class per launcher (the shape of Lightning's ``ClusterEnvironment``): each knows how to detect
itself from environment variables and reports rank, world size, local rank and local size.  The comm
layer uses this to choose a backend (``MEGDET_COMM=auto``) and torch.distributed uses it for
rendezvous.  Detection order matters: horovodrun (gloo) sets its own variables, mpirun/horovodrun
--mpi set OMPI_*/PMIX_*, srun sets SLURM_* (and PMIX_* with --mpi=pmix), torchrun sets RANK/WORLD_SIZE.
"""

from __future__ import annotations

import os
import subprocess
import zlib
from dataclasses import dataclass


@dataclass(frozen=True)
class ClusterEnvironment:
    """Position of this process in the job as reported by its launcher."""

    name: str
    rank: int
    size: int
    local_rank: int
    local_size: int

    @property
    def is_mpi(self) -> bool:
        """True when the processes share an MPI world (mpi4py and Horovod-MPI can initialise)."""
        return self.name in ("mpirun", "srun-pmix")


def _int(env: dict[str, str], *keys: str, default: int | None = None) -> int:
    for key in keys:
        if key in env and env[key] != "":
            return int(env[key])
    if default is None:
        raise KeyError(keys[0])
    return default


def detect(env: dict[str, str] | None = None) -> ClusterEnvironment:
    """Detect the launcher from environment variables (pure function of ``env``)."""
    env = dict(os.environ) if env is None else env
    if "HOROVOD_RANK" in env and "HOROVOD_GLOO_RENDEZVOUS_ADDR" in env:
        return ClusterEnvironment(
            "horovodrun-gloo",
            _int(env, "HOROVOD_RANK"),
            _int(env, "HOROVOD_SIZE"),
            _int(env, "HOROVOD_LOCAL_RANK"),
            _int(env, "HOROVOD_LOCAL_SIZE"),
        )
    if "OMPI_COMM_WORLD_RANK" in env or "PMI_RANK" in env:
        return ClusterEnvironment(
            "mpirun",
            _int(env, "OMPI_COMM_WORLD_RANK", "PMI_RANK"),
            _int(env, "OMPI_COMM_WORLD_SIZE", "PMI_SIZE"),
            _int(env, "OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID", default=0),
            _int(env, "OMPI_COMM_WORLD_LOCAL_SIZE", "MPI_LOCALNRANKS", default=1),
        )
    if "TORCHELASTIC_RUN_ID" in env or ("RANK" in env and "WORLD_SIZE" in env and "MASTER_ADDR" in env):
        return ClusterEnvironment(
            "torchrun",
            _int(env, "RANK"),
            _int(env, "WORLD_SIZE"),
            _int(env, "LOCAL_RANK", default=0),
            _int(env, "LOCAL_WORLD_SIZE", default=1),
        )
    if "SUBMITIT_LOCAL_GLOBALID" in env and _int(env, "SUBMITIT_LOCAL_NTASKS", default=1) > 1:
        return ClusterEnvironment(
            "submitit-local",
            _int(env, "SUBMITIT_LOCAL_GLOBALID"),
            _int(env, "SUBMITIT_LOCAL_NTASKS"),
            _int(env, "SUBMITIT_LOCAL_LOCALID", default=0),
            _int(env, "SUBMITIT_LOCAL_NTASKS"),
        )
    if "SLURM_PROCID" in env and "SLURM_STEP_ID" in env and _int(env, "SLURM_NTASKS", default=1) > 1:
        name = "srun-pmix" if "PMIX_RANK" in env else "srun"
        return ClusterEnvironment(
            name,
            _int(env, "SLURM_PROCID"),
            _int(env, "SLURM_NTASKS"),
            _int(env, "SLURM_LOCALID", default=0),
            _int(env, "SLURM_NTASKS_PER_NODE", default=1)
            if env.get("SLURM_NTASKS_PER_NODE", "").isdigit()
            else 1,
        )
    return ClusterEnvironment("local", 0, 1, 0, 1)


def slurm_master_addr(env: dict[str, str]) -> str:
    """First host of the Slurm allocation (what mmengine and Lightning use as MASTER_ADDR)."""
    nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or "127.0.0.1"
    try:
        out = subprocess.run(
            ["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, check=True
        ).stdout.split()
        return out[0] if out else "127.0.0.1"
    except (OSError, subprocess.CalledProcessError):
        return nodelist.split(",")[0]


def job_port(env: dict[str, str]) -> int:
    """A rendezvous port derived from the job id: stable across requeues, distinct between jobs."""
    if "MASTER_PORT" in env:
        return int(env["MASTER_PORT"])
    seed = (
        env.get("SLURM_JOB_ID")
        or env.get("SUBMITIT_LOCAL_JOB_ID")
        or env.get("OMPI_MCA_orte_hnp_uri")
        or str(os.getppid())
    )
    return 20000 + zlib.crc32(seed.encode()) % 30000
