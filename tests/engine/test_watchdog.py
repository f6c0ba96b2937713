"""The stall watchdog's GIL-free backstop: a main thread blocked in C code *with the GIL held* (what
stock Horovod's enqueue does when a peer freezes) still ends the process, with every thread's stack.

The blocking call is libc ``sleep`` through ``ctypes.PyDLL``, which -- unlike ``CDLL`` -- keeps the GIL
for the call: the watchdog's Python thread cannot run, so only the faulthandler backstop can end it.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time

WORKER = textwrap.dedent(
    """
    import ctypes, sys, time
    from megdet_hpc.engine.watchdog import StallWatchdog

    class Comm:
        rank, size, waiting = 0, 1, "allreduce (cgbn.3.fwd)"

    watchdog = StallWatchdog(float(sys.argv[1]), lambda: [Comm()], lambda: 7, grace_s=0.5)
    watchdog.start()
    if sys.argv[2] == "gil-held":
        def stuck_in_horovod_enqueue():
            ctypes.PyDLL(None).sleep(120)  # C code holding the GIL: the watchdog thread never runs
        stuck_in_horovod_enqueue()
    else:
        time.sleep(120)  # releases the GIL: the watchdog's own line and exit code
    """
)


def run(mode: str, timeout_s: float = 1.0) -> tuple[subprocess.CompletedProcess[str], float]:
    t0 = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-c", WORKER, str(timeout_s), mode], capture_output=True, text=True, timeout=60
    )
    return proc, time.monotonic() - t0


def test_a_main_thread_holding_the_gil_is_ended_by_the_backstop_with_its_stack() -> None:
    proc, took = run("gil-held")
    # First deadline = 2 x timeout (warm-up), then the backstop: 2 x grace + 5 s.
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert took < 30, took
    assert "Timeout" in proc.stderr and "stuck_in_horovod_enqueue" in proc.stderr, proc.stderr[-2000:]
    assert "stalled:" not in proc.stderr  # the Python thread could not run: only the backstop spoke


def test_a_main_thread_waiting_without_the_gil_gets_the_watchdogs_line_and_code_5() -> None:
    proc, took = run("gil-free")
    assert proc.returncode == 5, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if "stalled:" in line]
    assert len(lines) == 1 and "waits in allreduce (cgbn.3.fwd) after iteration 7" in lines[0], proc.stderr
    assert "Timeout" not in proc.stderr  # the backstop did not fire on top
    assert took < 30, took
