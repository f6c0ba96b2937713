"""Run a launcher here so that a stop signal reaches the ranks and their exit code comes back.

Why: each launcher does its own thing with a signal and with exit codes (measured with OpenMPI
4.1.4, torch 2.14, Horovod 0.28, on one host):

* ``mpirun`` turns SIGTERM, SIGINT and SIGHUP into SIGTERM to the ranks, then SIGKILL after
  ``odls_base_sigkill_timeout`` (1 s by default: too short to write a checkpoint), and exits 1
  whatever the ranks returned; SIGUSR1/SIGUSR2 it forwards as they are.
* ``torchrun`` forwards SIGTERM/SIGINT/SIGHUP/SIGQUIT, waits up to ``--shutdown-timeout`` (30 s) for
  the workers, then raises ``SignalException``: a traceback and exit 1.  A failed worker of any
  kind is a ``ChildFailedError`` report and exit 1.
* ``horovodrun --gloo`` forwards SIGTERM, then exits 1 with a ``RuntimeError`` traceback;
  ``horovodrun --mpi`` dies of the signal itself (143) and leaves mpirun and the ranks running.

So ``python -m megdet_hpc.launch local`` starts the launcher in a session of its own (a Ctrl-C in
the terminal reaches only this process), sends a stop signal it receives (TERM, INT, HUP, USR1,
USR2) straight to the rank processes -- SIGTERM for the first three, the signal itself for the
others -- and leaves the launcher alone, so no launcher's kill timer runs: the ranks checkpoint and
exit 3 in their own time.  A second TERM/INT/HUP ends the launcher (and with it the job).  Every
rank writes its exit code to ``$MEGDET_EXIT_DIR/rank<N>.code`` (``record_exit_code``, from
``utils.cli.run_cli``), and the wrapper exits with the ranks' code instead of the launcher's.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import FrameType

from megdet_hpc.utils.env import EXIT_DIR

_RANK_VARS = ("RANK", "OMPI_COMM_WORLD_RANK", "HOROVOD_RANK", "PMI_RANK", "PMIX_RANK", "SLURM_PROCID")
STOP = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
PASSED_AS_IS = (signal.SIGUSR1, signal.SIGUSR2)
EXIT_PEER_LOST = 5  # utils.cli's (not imported: this module is loaded by run_cli itself)


def record_exit_code(code: int) -> None:
    """Leave this rank's exit code for the wrapper (no-op outside ``launch local``).  Read without
    validation: this runs on the error path too (``distributed.init`` has checked the value)."""
    folder = os.environ.get(EXIT_DIR)
    if not folder:
        return
    rank = next((os.environ[k] for k in _RANK_VARS if os.environ.get(k, "").isdigit()), "0")
    with contextlib.suppress(OSError):  # the wrapper then falls back to the launcher's code
        Path(folder, f"rank{rank}.code").write_text(str(code))


def job_exit_code(folder: Path, nproc: int, launcher_code: int) -> int:
    """The job's code from the ranks' codes: a rank's own failure (2 bad input, 3 preempted, 4
    non-finite, 1 bug) before "lost a peer" (5, a consequence); the launcher's code when a rank
    left none (killed) and no rank said why."""
    codes = {}
    for path in folder.glob("rank*.code"):
        try:
            codes[path.name] = int(path.read_text())
        except (OSError, ValueError):
            continue
    failed = [c for c in codes.values() if c]
    own = [c for c in failed if c != EXIT_PEER_LOST]
    if own:
        return min(own)
    if failed:
        return EXIT_PEER_LOST
    if len(codes) < nproc:
        return launcher_code
    return 0


def rank_processes(launcher_pid: int, module: str) -> list:  # type: ignore[type-arg]
    """The launcher's descendants that run ``python -m module`` (the launchers themselves name the
    module among their arguments; the ranks' DataLoader workers share the rank's command line)."""
    import psutil

    def runs_module(proc: psutil.Process) -> bool:
        return proc.cmdline()[1:3] == ["-m", module]

    try:
        descendants = psutil.Process(launcher_pid).children(recursive=True)
    except psutil.Error:
        return []
    ranks = []
    for proc in descendants:
        try:
            if runs_module(proc) and not runs_module(proc.parent()):
                ranks.append(proc)
        except psutil.Error:
            continue
    return ranks


def run(command: Sequence[str], env: Mapping[str, str], nproc: int, marker: str) -> int:
    """Run ``command`` (a launcher), relaying stop signals to its ranks; the job's exit code."""
    with tempfile.TemporaryDirectory(prefix="megdet-exit-") as folder:
        proc = subprocess.Popen(list(command), env={**env, EXIT_DIR: folder}, start_new_session=True)
        stops = 0

        def relay(signum: int, frame: FrameType | None) -> None:
            nonlocal stops
            sig = signal.Signals(signum)
            if sig in STOP:
                stops += 1
            ranks = rank_processes(proc.pid, marker)
            if stops > 1 or not ranks:  # asked twice, or nothing started yet: end the launcher
                print(
                    f"megdet_hpc.launch local: {sig.name}: ending the launcher", file=sys.stderr, flush=True
                )
                proc.send_signal(signal.SIGTERM)
                return
            to_ranks = signal.SIGTERM if sig in STOP else sig
            print(
                f"megdet_hpc.launch local: {sig.name}: sending {to_ranks.name} to {len(ranks)} rank(s) "
                "(they checkpoint and exit 3; the same signal again ends the launcher)",
                file=sys.stderr,
                flush=True,
            )
            for rank in ranks:
                with contextlib.suppress(Exception):  # it has just exited
                    rank.send_signal(to_ranks)

        previous = {sig: signal.signal(sig, relay) for sig in (*STOP, *PASSED_AS_IS)}
        try:
            launcher_code = proc.wait()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        code = job_exit_code(Path(folder), nproc, launcher_code)
    if code != launcher_code:
        print(
            f"megdet_hpc.launch local: the ranks exited {code} (the launcher reported {launcher_code})",
            file=sys.stderr,
            flush=True,
        )
    return code
