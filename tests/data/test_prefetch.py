"""Device prefetching: batches arrive converted, and a process that just stops iterating still exits."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import torch

from megdet_hpc.data.prefetch import DevicePrefetcher

SCRIPT = """
import sys
from megdet_hpc.config import load_config
from megdet_hpc.distributed.single import SingleProcessComm
from megdet_hpc.engine.defaults import build_run
run = build_run(load_config(sys.argv[1], ["data.num_workers=2", "solver.max_iter=3"]), SingleProcessComm())
run.trainer.run_step()
print("stepped", flush=True)
"""  # the loader's workers ignore SIGTERM; nothing here shuts them down explicitly


def test_a_process_that_stops_iterating_still_exits(tiny_config) -> None:
    cfg = tiny_config(train={"eval_at_end": False})
    t0 = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(cfg)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=Path(__file__).resolve().parents[2],
    )
    assert proc.returncode == 0 and "stepped" in proc.stdout, proc.stderr[-2000:]
    assert time.monotonic() - t0 < 120


def test_batches_arrive_as_float_images_on_the_device() -> None:
    image = torch.full((3, 4, 5), 255, dtype=torch.uint8)
    batches = iter([([image], [{"boxes": torch.zeros(0, 4), "image_id": 7}], (0, 0))] * 2)
    prefetcher = DevicePrefetcher(batches, torch.device("cpu"))
    images, targets, position = next(prefetcher)
    assert images[0].dtype == torch.float32 and images[0].max() == 1.0
    assert targets[0]["image_id"] == 7 and position == (0, 0)
    prefetcher.shutdown()
    prefetcher.shutdown()  # idempotent
