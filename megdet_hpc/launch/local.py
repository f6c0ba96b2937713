"""Command lines for running a Python program on this machine under a real launcher.

Used by the benchmarks, the tests and ``python -m megdet_hpc.launch --local-launcher``: the command
lines are the ones a user types (``horovodrun -np N -H localhost:N --gloo|--mpi``,
``mpirun --oversubscribe -np N``, ``python -m torch.distributed.run --nproc-per-node N``).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

LAUNCHERS = ("single", "hvd-gloo", "hvd-mpi", "mpirun", "torchrun")
COMM_OF = {
    "single": "none",
    "hvd-gloo": "horovod",
    "hvd-mpi": "horovod",
    "mpirun": "mpi",
    "torchrun": "torch",
}


def local_command(launcher: str, nproc: int, argv: list[str], python: str | None = None) -> list[str]:
    """``argv`` are the arguments after ``python`` (a script path or ``-m module``)."""
    py = [python or sys.executable, *argv]
    if launcher == "single":
        return py
    if launcher == "hvd-gloo":
        return ["horovodrun", "-np", str(nproc), "-H", f"localhost:{nproc}", "--gloo", *py]
    if launcher == "hvd-mpi":
        return ["horovodrun", "-np", str(nproc), "-H", f"localhost:{nproc}", "--mpi",
                "--mpi-args=--oversubscribe --allow-run-as-root --bind-to none", *py]  # fmt: skip
    if launcher == "mpirun":
        return ["mpirun", "--oversubscribe", "--allow-run-as-root", "--bind-to", "none",
                "-np", str(nproc), *py]  # fmt: skip
    if launcher == "torchrun":
        return [
            python or sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc-per-node",
            str(nproc),
            *argv,
        ]
    raise ValueError(f"unknown launcher {launcher!r}; one of {', '.join(LAUNCHERS)}")


def local_env(
    launcher: str, extra: dict[str, str] | None = None, pythonpath: str | None = None
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
