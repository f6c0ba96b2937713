"""Logging set-up: rank 0 logs INFO to stdout and ``output_dir/log.txt``; other ranks WARNING+."""

from __future__ import annotations

import logging
import sys
from pathlib import Path


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
