"""Preemption signals only set a flag; the trainer acts on it at the next iteration boundary.

Saving inside a signal handler corrupts checkpoints (Lightning #21406): the handler here does nothing
but record which signal arrived.  All ranks then agree through the per-step vote the trainer already
does, rank 0 writes a checkpoint, and every rank exits with ``EXIT_PREEMPTED``.
"""

from __future__ import annotations

import signal
from types import FrameType


class StopFlag:
    def __init__(self) -> None:
        self.signal_name: str | None = None
        self._previous: dict[int, object] = {}

    @property
    def raised(self) -> bool:
        return self.signal_name is not None

    def _handler(self, signum: int, frame: FrameType | None) -> None:
        self.signal_name = signal.Signals(signum).name

    def install(self, names: list[str]) -> None:
        for name in names:
            self._previous[getattr(signal, name)] = signal.signal(getattr(signal, name), self._handler)

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)  # type: ignore[arg-type]
        self._previous.clear()
