"""One error path for every entry point (``python -m megdet_hpc.<x>``).

* Bad input (``UserError``, argparse errors) -> one line ``prog: error: ...`` on stderr, exit code 2.
* A collective that failed because a peer rank died (``distributed.lost_peer``) -> one line naming
  the lost rank, exit code 5: not this process's bug, and nothing the user typed.
* Ctrl-C outside the training loop (which checkpoints instead, ``engine/signals.py``) -> one line,
  exit code 130.
* Anything else -> its traceback, exit code 1.
* In a multi-rank MPI job a rank that fails calls ``MPI_Abort``: mpi4py would otherwise block in
  ``MPI_Finalize`` at exit while its peers wait in the next collective, and the job would hang until
  its wall time (Horovod and torchrun tear the job down by themselves).
* Every rank's exit code is also left where ``python -m megdet_hpc.launch local`` reads it
  (``launch.relay``): mpirun, torchrun and horovodrun replace the ranks' codes by their own (1).
"""

from __future__ import annotations

import argparse
import logging
import sys
import traceback
from collections.abc import Callable, Sequence
from typing import NoReturn

from megdet_hpc.utils.errors import UserError, one_line

EXIT_OK = 0
EXIT_FAILED = 1  # a bug: traceback printed
EXIT_BAD_INPUT = 2
EXIT_PREEMPTED = 3  # checkpoint written after a signal; resume (or the requeued job) continues the run
EXIT_NONFINITE = 4  # too many consecutive non-finite losses
# Another rank is gone (died) or stuck (frozen, unreachable): this one cannot go on.  One code for
# both, so a scheduler's requeue rule (Slurm ``RequeueExit=5``) covers every peer failure.
EXIT_PEER_LOST = 5  # another rank died: this one's collective failed (resume from the last checkpoint)
EXIT_STALLED = EXIT_PEER_LOST  # no step completed in train.stall_timeout_s (a frozen or unreachable peer)
EXIT_INTERRUPTED = 130  # Ctrl-C outside the training loop (the shell's code for SIGINT)


class ArgumentParser(argparse.ArgumentParser):
    """argparse with the project's error line (no usage dump) and overrides anywhere on the line."""

    def error(self, message: str) -> NoReturn:
        print(f"{self.prog}: error: {message}", file=sys.stderr, flush=True)
        sys.exit(EXIT_BAD_INPUT)

    def parse(self, argv: Sequence[str] | None = None) -> argparse.Namespace:
        """Like ``parse_args``, but positional overrides may also follow flags
        (``--no-resume solver.max_iter=4``)."""
        return self.parse_intermixed_args(argv)


def run_cli(main: Callable[[], int], prog: str) -> int:
    """Run ``main`` and map its failures to exit codes (see module docstring)."""
    from megdet_hpc.launch.relay import record_exit_code

    try:
        code = main()
        record_exit_code(code)
        return code
    except UserError as exc:
        print(f"{prog}: error: {one_line(exc)}", file=sys.stderr, flush=True)
        code = EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print(
            f"{prog}: error: interrupted (nothing saved since the last checkpoint)",
            file=sys.stderr,
            flush=True,
        )
        code = EXIT_INTERRUPTED
    except Exception as exc:  # noqa: BLE001 - a bug: keep the traceback, still end the job
        lost = _lost_peer(exc)
        if lost is not None:
            print(f"{prog}: error: {lost}", file=sys.stderr, flush=True)
            code = EXIT_PEER_LOST
        else:
            traceback.print_exc()
            code = EXIT_FAILED
    record_exit_code(code)
    abort_mpi_job(code)
    return code


def _lost_peer(exc: BaseException) -> str | None:
    """``distributed.lost_peer.describe`` when torch is already loaded (an entry point that never
    imported it cannot have failed in a collective)."""
    if "torch" not in sys.modules:
        return None
    from megdet_hpc.distributed.lost_peer import describe

    return describe(exc)


def abort_mpi_job(code: int) -> None:
    """End every rank of an MPI world of more than one process (no-op otherwise)."""
    mpi_module = sys.modules.get("mpi4py.MPI")
    if mpi_module is None:
        return
    mpi = mpi_module
    if not mpi.Is_initialized() or mpi.Is_finalized() or mpi.COMM_WORLD.Get_size() < 2:
        return
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    mpi.COMM_WORLD.Abort(code)
