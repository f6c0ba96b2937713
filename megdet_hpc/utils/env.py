"""Every ``MEGDET_*`` environment variable the package reads: its name, allowed values and default
here, read through one function each (the README's "Environment variables" table lists the same).

A bad value is a ``EnvError``: one line naming the variable, exit code 2 from every entry point (not a
traceback at the first collective).  An empty value means unset.  ``check_all`` reads every one of
them; ``distributed.init`` calls it, so a training job refuses a bad setting before any rendezvous.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

from megdet_hpc.utils.errors import UserError

COMM = "MEGDET_COMM"
CGBN_COMM = "MEGDET_CGBN_COMM"
TORCH_BACKEND = "MEGDET_TORCH_BACKEND"
COMM_TIMEOUT_S = "MEGDET_COMM_TIMEOUT_S"
EXIT_DIR = "MEGDET_EXIT_DIR"
REPORT_DIR = "MEGDET_REPORT_DIR"

COMM_BACKENDS = ("auto", "horovod", "torch", "mpi", "none")
CGBN_TRANSPORTS = ("main", "mpi", "nccl", "torch-gloo")
TORCH_PROCESS_GROUP_BACKENDS = ("gloo", "nccl", "mpi", "ucc")
TORCH_DEVICES = ("cpu", "cuda")
DEFAULT_COMM_TIMEOUT_S = 600.0


class EnvError(UserError, ValueError):
    """An environment variable with a value the package cannot use, with a one-line message."""


def _get(name: str) -> str:
    return os.environ.get(name, "").strip()


def _choice(name: str, choices: tuple[str, ...], default: str) -> str:
    value = _get(name) or default
    if value not in choices:
        raise EnvError(f"{name}={value!r} is not one of {', '.join(choices)}")
    return value


def comm_backend() -> str:
    """``MEGDET_COMM``: the training comm backend (default ``auto``: follows the launcher)."""
    return _choice(COMM, COMM_BACKENDS, "auto")


def cgbn_comm() -> str:
    """``MEGDET_CGBN_COMM``: what carries the CGBN statistics (default ``main``: the training comm)."""
    return _choice(CGBN_COMM, CGBN_TRANSPORTS, "main")


def torch_backend() -> str | None:
    """``MEGDET_TORCH_BACKEND``: torch.distributed's backend string, ``gloo`` or per device
    ``cpu:gloo,cuda:nccl`` (None when unset: it follows the training device)."""
    value = _get(TORCH_BACKEND)
    if not value:
        return None
    for item in value.split(","):
        device, _, backend = item.rpartition(":")
        if backend not in TORCH_PROCESS_GROUP_BACKENDS or (device and device not in TORCH_DEVICES):
            raise EnvError(
                f"{TORCH_BACKEND}={value!r} is not a torch.distributed backend: one of "
                f"{', '.join(TORCH_PROCESS_GROUP_BACKENDS)}, or per device like cpu:gloo,cuda:nccl"
            )
    return value


def comm_timeout_s() -> float:
    """``MEGDET_COMM_TIMEOUT_S``: torch.distributed's timeout in seconds (default 600), a number > 0."""
    text = _get(COMM_TIMEOUT_S)
    if not text:
        return DEFAULT_COMM_TIMEOUT_S
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise EnvError(f"{COMM_TIMEOUT_S}={text!r} is not a number of seconds > 0")
    return value


def _folder(name: str) -> Path | None:
    text = _get(name)
    if not text:
        return None
    if not Path(text).is_dir():
        raise EnvError(f"{name}={text!r} is not an existing directory")
    return Path(text)


def exit_dir() -> Path | None:
    """``MEGDET_EXIT_DIR``: where each rank leaves its exit code (set by ``launch local`` for its ranks)."""
    return _folder(EXIT_DIR)


def report_dir() -> Path | None:
    """``MEGDET_REPORT_DIR``: where each rank writes its report (set by ``launch.local.run_and_collect``)."""
    return _folder(REPORT_DIR)


def check_all() -> None:
    """Read every variable above: the first bad one raises ``EnvError``."""
    for read in (comm_backend, cgbn_comm, torch_backend, comm_timeout_s, exit_dir, report_dir):
        read()
