"""Slurm from inside a job and from the submitting side: requeue, master address, queue state.

``requeue_job`` is what the preemption policy calls after its checkpoint (Lightning's
``SLURMEnvironment`` and submitit's ``_requeue`` do the same): ``scontrol requeue`` of this job,
array-aware, from rank 0 only.
"""

from __future__ import annotations

import logging
import os
import subprocess
from collections.abc import Mapping

log = logging.getLogger("megdet_hpc.launch")


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


def master_addr(env: Mapping[str, str]) -> str:
    """First host of the Slurm allocation (what mmengine and Lightning use as MASTER_ADDR)."""
    nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or "127.0.0.1"
    try:
        out = subprocess.run(
            ["scontrol", "show", "hostnames", nodelist],
            capture_output=True,
            text=True,
            check=True,
            timeout=30,
        ).stdout.split()
        return out[0] if out else "127.0.0.1"
    except (OSError, subprocess.CalledProcessError, subprocess.TimeoutExpired):
        return nodelist.split(",")[0]


def job_gone(job: str) -> bool:
    """True once ``job`` has left the queue (asks squeue: sacct needs slurmdbd, which many clusters,
    and the test cluster, do not run)."""
    out = subprocess.run(["squeue", "-h", "-j", job, "-o", "%T"], capture_output=True, text=True, timeout=60)
    if out.returncode != 0:  # purged from the controller's memory (MinJobAge) means long gone
        return "invalid job id" in out.stderr.lower()
    return not out.stdout.strip()
