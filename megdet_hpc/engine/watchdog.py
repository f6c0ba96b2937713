"""The stall watchdog: a job whose step stops completing ends, saying where it hangs.

Why: a collective whose peer is frozen (SIGSTOP, a hung driver) or unreachable (a node's link down)
does not fail.  MPI waits forever, a TCP collective waits for the kernel's retransmission timeout
(many minutes), torch.distributed for ``MEGDET_COMM_TIMEOUT_S`` (600 s by default) -- and on a cluster
that burns the allocation up to its wall time with no message.  No backend offers one timeout that
covers every wait, so the training loop measures what matters, the time since the last completed step
(``train.stall_timeout_s``), from a thread of its own that needs nothing from the blocked main thread.

When the deadline passes, this rank writes **one** line to stderr -- the collective it is inside
(``Comm.waiting``, which every collective of ``Comm`` sets), its rank and host, the last completed
iteration -- waits a short grace so its peers (their deadlines expire within the same moment: they
finished the same step) can print theirs before a launcher tears the job down, lets a checkpoint write
in flight finish, and ends the process with ``EXIT_STALLED``.  ``os._exit``: the main thread is stuck
inside C code, so no exception can reach it, and no finaliser may run that would wait on the dead peer.
What is already on disk stays as it was: checkpoints are written to a temporary and renamed, so a write
cut short leaves a temporary the next start removes, never a damaged checkpoint.

**A backstop that needs no GIL.**  The watchdog is a Python thread: if the main thread blocks inside C
code *with the GIL held*, it never runs.  Stock Horovod does exactly that -- its enqueue functions wait
for a lock the background thread holds through a negotiation with the frozen peer (the project's build
releases the GIL there: ``scripts/build_horovod.sh``, fix 3) -- and any other extension may.  So every
deadline is also armed in ``faulthandler`` (its timer is a C thread), ``backstop_s`` after the
watchdog's own: if the line above was not written by then, faulthandler prints the Python stack of
every thread (the collective the main thread is in among them) and ends the process with exit code 1.
"""

from __future__ import annotations

import contextlib
import faulthandler
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator, Sequence

from megdet_hpc.distributed.comm import Comm
from megdet_hpc.utils.cli import EXIT_STALLED


class StallWatchdog:
    """Ends the process when no ``beat`` came for ``timeout_s`` seconds (0 disables it)."""

    def __init__(
        self,
        timeout_s: float,
        comms: Callable[[], Sequence[Comm]],
        iteration: Callable[[], int],
        before_exit: Callable[[float], None] | None = None,
        grace_s: float | None = None,
        prog: str = "megdet_hpc.train",
    ) -> None:
        self.timeout_s = timeout_s
        self.comms = comms  # asked when it fires: the CGBN statistics comm is created lazily
        self.iteration = iteration
        self.before_exit = before_exit
        # Long enough for peers blocked in the same collective to reach their own deadline and print.
        self.grace_s = min(5.0, max(1.0, timeout_s / 10)) if grace_s is None else grace_s
        # After the watchdog's own end (deadline + a tick + the grace + a checkpoint write's grace).
        self.backstop_s = 2 * self.grace_s + 5.0
        self.prog = prog
        self.host = socket.gethostname()
        self._last = time.monotonic()
        self._limit = timeout_s
        self._paused = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def enabled(self) -> bool:
        return self.timeout_s > 0

    def start(self) -> None:
        if not self.enabled or self._thread is not None:
            return
        self.beat()
        # The first step also warms up (allocator, lazy initialisation, cuDNN autotuning, page cache of
        # the data): it gets twice the time.
        self._limit = 2 * self.timeout_s
        self._stop.clear()
        self._thread = threading.Thread(target=self._watch, name="megdet-stall-watchdog", daemon=True)
        self._thread.start()
        self._arm_backstop()

    def beat(self) -> None:
        """A step completed: the deadline starts again."""
        self._last = time.monotonic()
        self._limit = self.timeout_s
        if self._thread is not None and not self._paused:
            self._arm_backstop()

    def _arm_backstop(self) -> None:
        """Re-arm faulthandler's GIL-free timer (a C thread per arming: microseconds per step)."""
        faulthandler.dump_traceback_later(self._limit + self.backstop_s, exit=True)

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """No deadline inside (an evaluation: its length depends on the validation set, not a step)."""
        self._paused += 1
        faulthandler.cancel_dump_traceback_later()
        try:
            yield
        finally:
            self._paused -= 1
            self.beat()

    def stop(self) -> None:
        self._stop.set()
        faulthandler.cancel_dump_traceback_later()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def waiting_in(self) -> str:
        for comm in self.comms():
            if comm.waiting:
                return comm.waiting
        return "no collective (computing, or loading data)"

    def report(self, waited_s: float) -> str:
        comm = self.comms()[0]
        return (
            f"{self.prog}: error: stalled: no training step completed in {waited_s:.0f} s "
            f"(train.stall_timeout_s={self.timeout_s:g}); rank {comm.rank} of {comm.size} on {self.host} "
            f"waits in {self.waiting_in()} after iteration {self.iteration()}; exiting with code "
            f"{EXIT_STALLED} so the job ends and can be requeued"
        )

    def _watch(self) -> None:
        tick = min(1.0, self.timeout_s / 4)
        while not self._stop.wait(tick):
            waited = time.monotonic() - self._last
            if self._paused or waited < self._limit:
                continue
            self._fire(waited)
            return

    def _fire(self, waited_s: float) -> None:
        # os.write, not print/logging: the blocked main thread may hold the stream's lock.
        os.write(2, (self.report(waited_s) + "\n").encode())
        faulthandler.dump_traceback_later(self.backstop_s, exit=True)  # bounds the grace below too
        deadline = time.monotonic() + self.grace_s
        if self.before_exit is not None:
            with contextlib.suppress(Exception):
                self.before_exit(self.grace_s)
        time.sleep(max(0.0, deadline - time.monotonic()))
        os._exit(EXIT_STALLED)
