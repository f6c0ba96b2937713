"""One writer per output directory: an OS file lock (``fcntl.flock``) held by the training's rank 0.

Why a kernel lock and not a PID file: the kernel releases it when the holder dies however it dies
(kill -9, node reboot of a local disk, Slurm's SIGKILL after the grace time), so a requeued job is
never locked out by its own dead predecessor, while a second live writer -- a double submission, or a
training started on a live run's directory -- is refused and told who holds it.  The lock file holds
the holder's host, pid and start time for that message.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from pathlib import Path

from megdet_hpc.checkpoint.io import CheckpointError

LOCK_NAME = ".megdet.lock"


class OutputDirLock:
    def __init__(self, folder: Path) -> None:
        self.path = Path(folder) / LOCK_NAME
        self._fd: int | None = None

    def acquire(self) -> None:
        """Take the lock or raise ``CheckpointError`` naming the live holder."""
        if self._fd is not None:
            return
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = self._holder(fd)
            os.close(fd)
            raise CheckpointError(
                f"{self.path.parent} is in use by another training ({holder}); one writer per output dir"
            ) from None
        os.ftruncate(fd, 0)
        info = {"host": socket.gethostname(), "pid": os.getpid(), "since": time.strftime("%Y-%m-%d %H:%M:%S")}
        os.write(fd, json.dumps(info).encode())
        os.fsync(fd)
        self._fd = fd

    @staticmethod
    def _holder(fd: int) -> str:
        try:
            info = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
            return f"pid {info['pid']} on {info['host']} since {info['since']}"
        except (OSError, ValueError, KeyError):
            return "holder unknown"

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    @property
    def held(self) -> bool:
        return self._fd is not None
