"""The one base class of errors a user can fix (bad config, data, checkpoint, launch parameters).

Every entry point turns a ``UserError`` into one line on stderr and exit code 2
(``megdet_hpc.utils.cli.run_cli``); anything else is a bug and keeps its traceback.  Each subsystem
subclasses it together with the builtin it is closest to (``ConfigError(UserError, ValueError)``), so
callers may catch either.
"""

from __future__ import annotations


class UserError(Exception):
    """An input problem with a one-line message that names it."""


def one_line(exc: BaseException) -> str:
    """The message of ``exc`` as one line.

    A DataLoader worker re-raises its exception wrapped as "Caught DataError in DataLoader worker
    process 0." + the worker's traceback; the useful line (which file) is the last one.
    """
    lines = [line for line in str(exc).strip().splitlines() if line.strip()]
    if not lines:
        return type(exc).__name__
    if lines[0].startswith("Caught ") and "DataLoader worker" in lines[0]:
        last = lines[-1].strip()
        marker = f"{type(exc).__name__}: "
        return last.split(marker, 1)[1] if marker in last else last
    return lines[0]
