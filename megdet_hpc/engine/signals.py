"""Preemption signals only set a flag; the trainer acts on it at the next iteration boundary.

Saving inside a signal handler corrupts checkpoints (Lightning #21406): the handler here does nothing
but record which signal arrived.  All ranks then agree through the per-step vote the trainer already
does, rank 0 writes a checkpoint, and every rank exits with ``EXIT_PREEMPTED``.

SIGINT (Ctrl-C) and SIGHUP (the terminal went away) take the same path -- checkpoint, exit 3 --
but never requeue a Slurm job: a person stopped it, not the scheduler.  Repeats change nothing
(a terminal's Ctrl-C reaches the ranks both directly and forwarded by torchrun).  Before this, Ctrl-C
was an 80-line traceback with no checkpoint and SIGHUP killed the process without one; outside the
training loop (loading data, building the model) Ctrl-C is one line and exit 130 (``run_cli``).
"""

from __future__ import annotations

import signal
from collections.abc import Sequence
from types import FrameType

INTERRUPTS = ("SIGINT", "SIGHUP")


class StopFlag:
    def __init__(self) -> None:
        self.signal_name: str | None = None
        self.interrupted = False  # by a person (INTERRUPTS): checkpoint, but do not requeue
        self._previous: dict[int, object] = {}

    @property
    def raised(self) -> bool:
        return self.signal_name is not None

    def _handler(self, signum: int, frame: FrameType | None) -> None:
        self.signal_name = signal.Signals(signum).name

    def _interrupt(self, signum: int, frame: FrameType | None) -> None:
        if self.signal_name is None:
            self.interrupted = True
            self.signal_name = signal.Signals(signum).name

    @property
    def requeue(self) -> bool:
        """Whether the stop may requeue the job (a scheduler's signal, or a peer's)."""
        return not self.interrupted

    def install(self, names: Sequence[str], interrupts: tuple[str, ...] = INTERRUPTS) -> None:
        for name in names:
            self._previous[getattr(signal, name)] = signal.signal(getattr(signal, name), self._handler)
        for name in interrupts:
            if name not in names:
                self._previous[getattr(signal, name)] = signal.signal(getattr(signal, name), self._interrupt)

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)  # type: ignore[arg-type]
        self._previous.clear()
