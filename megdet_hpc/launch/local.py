"""Command lines for running a Python program on this machine under a real launcher.

Used by the benchmarks, the tests and ``python -m megdet_hpc.launch --local-launcher``: the command
lines are the ones a user types (``horovodrun -np N -H localhost:N --gloo|--mpi``,
``mpirun --oversubscribe -np N``, ``python -m torch.distributed.run --nproc-per-node N``).
"""

from __future__ import annotations

import sys

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
