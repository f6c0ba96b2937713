"""Logging and progress bars: rank 0 logs INFO to stdout and ``output_dir/log.txt``; others WARNING+."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

from tqdm import tqdm


def setup_logging(rank: int, output_dir: Path | None = None) -> None:
    root = logging.getLogger("megdet_hpc")
    root.handlers.clear()
    root.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    fmt = logging.Formatter(f"[%(asctime)s r{rank} %(name)s] %(levelname)s %(message)s", "%H:%M:%S")
    stream = logging.StreamHandler(sys.stdout)
    stream.setFormatter(fmt)
    root.addHandler(stream)
    if output_dir is not None and rank == 0:
        output_dir.mkdir(parents=True, exist_ok=True)
        fh = logging.FileHandler(output_dir / "log.txt")
        fh.setFormatter(fmt)
        root.addHandler(fh)
    root.propagate = False


def progress_bar(total: int, desc: str, enabled: bool, **kwargs: Any) -> tqdm:
    """A tqdm bar that is fit for a Slurm log as well as a terminal.

    Why: in a batch job stderr is a file. tqdm's default unicode blocks and 10 redraws a second turn
    ``logs/*.out`` into megabytes of carriage returns, and a job killed mid-write (preemption grace time
    over) can leave half of a multi-byte character that breaks every tool reading the log as UTF-8. So
    off a terminal the bar is ASCII and redraws at most every 30 s.
    """
    interactive = (kwargs.get("file") or sys.stderr).isatty()
    kwargs.setdefault("mininterval", 0.1 if interactive else 30.0)
    return tqdm(
        total=total,
        desc=desc,
        disable=not enabled,
        ascii=not interactive,
        dynamic_ncols=interactive,
        **kwargs,
    )
