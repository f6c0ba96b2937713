"""Run a Python program on this machine under a real launcher, and collect what each rank reports.

The command lines are the ones a user types (``horovodrun -np N -H localhost:N --gloo|--mpi``,
``mpirun --oversubscribe -np N``, ``python -m torch.distributed.run --nproc-per-node N``).  Tests,
benchmarks, the planner's calibration and ``python -m megdet_hpc.launch local`` all go through
``run``; programs that report results call ``write_report`` on every rank and the caller gets them
back from ``run_and_collect`` -- one protocol instead of a temporary JSON file per script.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from megdet_hpc.launch.names import COMM_OF, HVD_GLOO, HVD_MPI, LAUNCH_METHODS, MPIRUN, SINGLE, TORCHRUN
from megdet_hpc.utils import env as settings
from megdet_hpc.utils.env import REPORT_DIR


class LaunchFailed(RuntimeError):
    """A launched job exited non-zero; the message carries the tails of its output."""

    def __init__(self, proc: subprocess.CompletedProcess[str], command: list[str]) -> None:
        self.proc = proc
        super().__init__(
            f"{' '.join(command)} exited {proc.returncode}\n"
            f"--- stdout ---\n{proc.stdout[-4000:]}\n--- stderr ---\n{proc.stderr[-4000:]}"
        )


def local_command(launcher: str, nproc: int, argv: list[str], python: str | None = None) -> list[str]:
    """The command line of launch method ``launcher`` (``launch.names.LAUNCH_METHODS``); ``argv`` are
    the arguments after ``python`` (a script path or ``-m module``)."""
    py = [python or sys.executable, *argv]
    if launcher == SINGLE:
        return py
    if launcher == HVD_GLOO:
        return ["horovodrun", "-np", str(nproc), "-H", f"localhost:{nproc}", "--gloo", *py]
    if launcher == HVD_MPI:
        mpi_args = "--oversubscribe --allow-run-as-root --bind-to none"
        return [
            "horovodrun",
            "-np",
            str(nproc),
            "-H",
            f"localhost:{nproc}",
            "--mpi",
            f"--mpi-args={mpi_args}",
            *py,
        ]
    if launcher == MPIRUN:
        return [
            "mpirun",
            "--oversubscribe",
            "--allow-run-as-root",
            "--bind-to",
            "none",
            "-np",
            str(nproc),
            *py,
        ]
    if launcher == TORCHRUN:
        return [
            python or sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",  # a free rendezvous port: two local jobs never collide on 29500
            "--nproc-per-node",
            str(nproc),
            *argv,
        ]
    raise ValueError(f"unknown launcher {launcher!r}; one of {', '.join(LAUNCH_METHODS)}")


def local_env(
    launcher: str, extra: Mapping[str, str] | None = None, pythonpath: str | None = None
) -> dict[str, str]:
    """The environment for ``local_command``: one thread per rank, OpenMPI allowed as root, the comm
    backend that matches the launcher, and this Python's bin dir (horovodrun, torchrun) first on PATH."""
    env = dict(os.environ)
    env.update(
        OMP_NUM_THREADS="1",
        OMPI_ALLOW_RUN_AS_ROOT="1",
        OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1",
        MEGDET_COMM=COMM_OF[launcher],
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
    )
    if pythonpath:
        env["PYTHONPATH"] = f"{pythonpath}{os.pathsep}{env.get('PYTHONPATH', '')}"
    env.update(extra or {})
    return env


def run(
    launcher: str,
    nproc: int,
    argv: list[str],
    *,
    env: Mapping[str, str] | None = None,
    cwd: str | Path | None = None,
    pythonpath: str | None = None,
    timeout: float = 600,
    check: bool = True,
) -> subprocess.CompletedProcess[str]:
    """Run ``python argv`` under ``launcher`` with ``nproc`` processes; ``LaunchFailed`` when it fails
    and ``check`` is set."""
    command = local_command(launcher, nproc, argv)
    proc = subprocess.run(
        command,
        cwd=cwd,
        env=local_env(launcher, env, pythonpath),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if check and proc.returncode != 0:
        raise LaunchFailed(proc, command)
    return proc


@dataclass
class Collected:
    proc: subprocess.CompletedProcess[str]
    reports: list[dict[str, Any]]  # one per rank that called write_report, by rank


def run_and_collect(
    launcher: str, nproc: int, argv: list[str], *, env: Mapping[str, str] | None = None, **kwargs: Any
) -> Collected:
    """``run`` a program that calls ``write_report`` and return every rank's report."""
    with tempfile.TemporaryDirectory(prefix="megdet-report-") as folder:
        proc = run(launcher, nproc, argv, env={**(env or {}), REPORT_DIR: folder}, **kwargs)
        files = sorted(Path(folder).glob("rank*.json"), key=lambda p: int(p.stem[4:]))
        return Collected(proc, [json.loads(p.read_text()) for p in files])


def write_report(rank: int, payload: dict[str, Any]) -> Path | None:
    """Called by a launched program on every rank that has something to report (no-op when it was
    not started by ``run_and_collect``)."""
    folder = settings.report_dir()
    if folder is None:
        return None
    path = folder / f"rank{rank}.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(payload))
    tmp.replace(path)
    return path
