"""Slurm from inside a job and from the submitting side: requeue, master address, queue state.

``requeue_job`` is what the preemption policy calls after its checkpoint (Lightning's
``SLURMEnvironment`` and submitit's ``_requeue`` do the same): ``scontrol requeue`` of this job,
array-aware, from rank 0 only.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
from collections.abc import Mapping, MutableMapping
from pathlib import Path

from megdet_hpc.utils.errors import UserError

log = logging.getLogger("megdet_hpc.launch")


class SlurmError(UserError, ValueError):
    """A Slurm value this process cannot use (e.g. a malformed node list), with a one-line message."""


def separate_mpi_shared_memory(
    env: MutableMapping[str, str] | None = None, shm: Path = Path("/dev/shm")
) -> Path | None:
    """After a requeue, give OpenMPI's shared-memory segments a directory of this run; before MPI_Init.

    Why: a requeued job keeps its job id and its steps their ids, so OpenMPI names its segments
    (``vader_segment.<host>.<jobid>.<local rank>`` in /dev/shm, the jobid derived from the PMIx
    namespace of job + step) exactly as the run before did.  When the requeue killed that run before
    MPI_Finalize, its segments are still there, and the restarted ranks can map them stale: a
    segfault in the restarted job's start-up, seen once on the multi-node test cluster.  One folder per
    restart (``/dev/shm/megdet-ompi-<job>.<restart>``) keeps the names apart.  A
    ``OMPI_MCA_btl_vader_backing_directory`` set by the user wins; outside a restarted Slurm job,
    nothing changes.  Returns the folder used, if any.
    """
    env = os.environ if env is None else env
    job, restart = env.get("SLURM_JOB_ID"), env.get("SLURM_RESTART_COUNT", "0")
    key = "OMPI_MCA_btl_vader_backing_directory"
    if not job or restart in ("", "0") or key in env or not shm.is_dir():
        return None
    folder = shm / f"megdet-ompi-{job}.{restart}"
    folder.mkdir(mode=0o700, exist_ok=True)  # every rank of the node: the first one creates it
    env[key] = str(folder)
    return folder


def job_id(env: Mapping[str, str] | None = None) -> str | None:
    """This job's id as ``scontrol`` wants it (``ARRAYJOB_TASK`` for array tasks); None outside Slurm."""
    env = os.environ if env is None else env
    job = env.get("SLURM_JOB_ID")
    if not job:
        return None
    if env.get("SLURM_ARRAY_JOB_ID") and env.get("SLURM_ARRAY_TASK_ID"):
        return f"{env['SLURM_ARRAY_JOB_ID']}_{env['SLURM_ARRAY_TASK_ID']}"
    return job


def requeue_job(env: Mapping[str, str] | None = None) -> bool:
    """``scontrol requeue`` this job when running under Slurm; True if it was requeued."""
    job = job_id(env)
    if job is None:
        return False
    try:
        proc = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as exc:
        log.error("scontrol requeue %s failed: %s", job, exc)
        return False
    if proc.returncode != 0:
        log.error("scontrol requeue %s failed: %s", job, proc.stderr.strip())
        return False
    log.warning("requeued Slurm job %s", job)
    return True


def parse_hostlist(expression: str) -> list[str]:
    """The host names of a Slurm hostlist expression, in order (what ``scontrol show hostnames``
    prints): ``node[01-04,07]`` -> node01..node04, node07; ``a[1-2]b,c`` -> a1b, a2b, c; several
    bracket groups in one name are a product (``r[1-2]n[1-2]`` -> r1n1, r1n2, r2n1, r2n2).  A range
    keeps the width of its first number (``[08-10]`` -> 08, 09, 10).  ``ValueError`` when malformed."""
    hosts: list[str] = []
    for name in _split_top_level(expression):
        expanded = [""]
        for piece in re.split(r"(\[[^\]]*\])", name):  # literal text and bracket groups, in order
            values = _expand_bracket(piece[1:-1], expression) if piece.startswith("[") else [piece]
            expanded = [prefix + value for prefix in expanded for value in values]
        hosts.extend(expanded)
    return hosts


def _split_top_level(expression: str) -> list[str]:
    """``expression`` split at the commas outside brackets (brackets checked for balance)."""
    names, depth, start = [], 0, 0
    for i, char in enumerate(expression):
        if char == "[":
            depth += 1
        elif char == "]":
            depth -= 1
        elif char == "," and depth == 0:
            names.append(expression[start:i])
            start = i + 1
        if depth not in (0, 1):
            raise ValueError(f"hostlist {expression!r}: unbalanced brackets")
    names.append(expression[start:])
    if depth or any(not name for name in names):
        raise ValueError(f"hostlist {expression!r}: unbalanced brackets or an empty name")
    return names


def _expand_bracket(group: str, expression: str) -> list[str]:
    values = []
    for part in group.split(","):
        match = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
        if match is None:
            raise ValueError(f"hostlist {expression!r}: {part!r} is not a number or a range")
        low, high = match.group(1), match.group(2) or match.group(1)
        if int(high) < int(low):
            raise ValueError(f"hostlist {expression!r}: range {part!r} runs backwards")
        values.extend(f"{n:0{len(low)}d}" for n in range(int(low), int(high) + 1))
    return values


def hostnames(expression: str) -> list[str]:
    """``scontrol show hostnames`` of ``expression`` where scontrol exists, ``parse_hostlist``
    otherwise (or when scontrol fails)."""
    if shutil.which("scontrol"):
        try:
            out = subprocess.run(
                ["scontrol", "show", "hostnames", expression],
                capture_output=True,
                text=True,
                check=True,
                timeout=30,
            ).stdout.split()
            if out:
                return out
        except (OSError, subprocess.CalledProcessError, subprocess.TimeoutExpired):
            pass
    return parse_hostlist(expression)


def master_addr(env: Mapping[str, str]) -> str:
    """First host of the Slurm allocation (what mmengine and Lightning use as MASTER_ADDR): of the
    step's node list, else the job's; 127.0.0.1 when neither is set."""
    nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST")
    if not nodelist:
        return "127.0.0.1"
    try:
        hosts = hostnames(nodelist)
    except ValueError as exc:
        raise SlurmError(f"cannot find the master address: {exc}") from exc
    return hosts[0] if hosts else "127.0.0.1"


def job_gone(job: str) -> bool:
    """True once ``job`` has left the queue (asks squeue: sacct needs slurmdbd, which many clusters,
    and the test cluster, do not run)."""
    out = subprocess.run(["squeue", "-h", "-j", job, "-o", "%T"], capture_output=True, text=True, timeout=60)
    if out.returncode != 0:  # purged from the controller's memory (MinJobAge) means long gone
        return "invalid job id" in out.stderr.lower()
    return not out.stdout.strip()
