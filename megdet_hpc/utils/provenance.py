"""What produced a result: the commit, library versions, host and device (stored in every results JSON)."""

from __future__ import annotations

import os
import platform
import socket
import subprocess
from pathlib import Path
from typing import Any


def git_commit(where: str | Path | None = None) -> str:
    """HEAD of the git checkout holding ``where`` (default: the current directory), ``+dirty`` with
    uncommitted changes to tracked files; "unknown" outside a checkout or without git.  The installed
    package does not know where a repository is: the tools run from one (``make experiment``)."""
    try:
        cwd = Path(where) if where is not None else Path.cwd()
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=10
        )
        if sha.returncode != 0:
            return "unknown"
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=10,
        )
        return sha.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"


def environment(where: str | Path | None = None) -> dict[str, Any]:
    """Commit (of the checkout holding ``where``, default the current directory), host, versions."""
    import torch
    import torchvision

    env: dict[str, Any] = {
        "commit": git_commit(where),
        "host": socket.gethostname(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
    }
    try:
        import horovod

        env["horovod"] = horovod.__version__
    except ImportError:
        env["horovod"] = None
    return env
