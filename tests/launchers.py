"""Run a Python program under a real launcher from the repository root (``megdet_hpc.launch.local``).

Every multi-process test goes through here so the command lines are the ones users type:
``horovodrun -np N -H localhost:N --gloo|--mpi``, ``mpirun --oversubscribe -np N`` and
``python -m torch.distributed.run --nproc-per-node N``.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

from megdet_hpc.launch.local import local_command, run_and_collect
from megdet_hpc.launch.local import run as _run

REPO = Path(__file__).resolve().parent.parent
command = local_command

__all__ = ["REPO", "collect", "command", "run"]


def run(
    launcher: str,
    nproc: int,
    argv: list[str],
    env: dict[str, str] | None = None,
    timeout: float = 300,
    check: bool = True,
) -> subprocess.CompletedProcess[str]:
    return _run(launcher, nproc, argv, env=env, cwd=REPO, pythonpath=str(REPO), timeout=timeout, check=check)


def collect(
    launcher: str, nproc: int, argv: list[str], env: dict[str, str] | None = None, timeout: float = 300
):
    """``run`` a program that calls ``write_report`` on its ranks; returns the reports by rank."""
    return run_and_collect(
        launcher, nproc, argv, env=env, cwd=REPO, pythonpath=str(REPO), timeout=timeout
    ).reports
