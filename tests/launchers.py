"""Run a Python program under a real launcher from the repository root (``megdet_hpc.launch.local``).

Every multi-process test goes through here so the command lines are the ones users type:
``horovodrun -np N -H localhost:N --gloo|--mpi``, ``mpirun --oversubscribe -np N`` and
``python -m torch.distributed.run --nproc-per-node N``.
"""

from __future__ import annotations

import json
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


EXIT_PROBE = REPO / "tests" / "exit_probe"


def exit_probe_env(folder: Path) -> dict[str, str]:
    """The environment under which every process records its threads at exit in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    return {"PYTHONPATH": f"{REPO}:{EXIT_PROBE}", "MEGDET_TEST_EXIT_THREADS": str(folder)}


def threads_at_exit(folder: Path) -> dict[int, list[str]]:
    """What ``exit_probe_env`` recorded: the native thread names of each process, by pid."""
    return {int(p.stem): json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))}


def gloo_threads_at_exit(folder: Path) -> dict[int, list[str]]:
    """The processes whose torch gloo threads (runloops, the TCP device loop) were still running at
    exit -- each one could abort its process in interpreter finalisation."""
    found = {pid: [n for n in names if "gloo" in n] for pid, names in threads_at_exit(folder).items()}
    return {pid: names for pid, names in found.items() if names}
