"""Shared CLI plumbing: turn known user errors into one line on stderr and exit code 2."""

from __future__ import annotations

import sys
from collections.abc import Callable

from megdet_hpc.checkpoint import CheckpointError
from megdet_hpc.config import ConfigError
from megdet_hpc.data.coco import DataError
from megdet_hpc.distributed import CommError
from megdet_hpc.engine.signals import EXIT_BAD_INPUT

USER_ERRORS = (ConfigError, DataError, CheckpointError, CommError)


def run_cli(main: Callable[[], int], prog: str) -> int:
    try:
        return main()
    except USER_ERRORS as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr, flush=True)
        return EXIT_BAD_INPUT
