"""Run a Python script under a real launcher and return the completed process.

Every multi-process test goes through here so the command lines are the ones users type:
``horovodrun -np N -H localhost:N --gloo|--mpi``, ``mpirun --oversubscribe -np N`` and
``python -m torch.distributed.run --nproc-per-node N``.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

from megdet_hpc.launch.local import COMM_OF, local_command, local_env

REPO = Path(__file__).resolve().parent.parent


def command(launcher: str, nproc: int, argv: list[str]) -> list[str]:
    return local_command(launcher, nproc, argv)


def comm_for(launcher: str) -> str:
    return COMM_OF[launcher]


def run(
    launcher: str,
    nproc: int,
    argv: list[str],
    env: dict[str, str] | None = None,
    timeout: float = 300,
    check: bool = True,
) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        command(launcher, nproc, argv),
        cwd=REPO,
        env=local_env(launcher, env, pythonpath=str(REPO)),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{launcher} -np {nproc} {' '.join(argv)} exited {proc.returncode}\n"
            f"--- stdout ---\n{proc.stdout[-4000:]}\n--- stderr ---\n{proc.stderr[-4000:]}"
        )
    return proc
