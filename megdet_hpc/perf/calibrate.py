"""Measure this machine's collective latency/bandwidth and training-step time with real processes.

``python -m megdet_hpc.perf.calibrate --collectives OUT --config C`` (under mpirun/horovodrun) times a
512 B allreduce (latency) and the config's gradient allreduce (bandwidth) through the launcher's comm
backend.
``--step OUT --config C`` times ``Trainer._step`` of a config (any world size).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path


def collectives(out: Path, config: str, overrides: list[str], repeats: int = 200) -> None:
    """Latency from a 512 B allreduce; bandwidth from the gradient allreduce the trainer really issues
    (``Comm.allreduce_coalesced_`` over tensors shaped like the config's trainable parameters)."""
    import torch

    from megdet_hpc import distributed
    from megdet_hpc.config import load_config
    from megdet_hpc.modeling import build_model

    comm = distributed.init()
    lat = []
    small = torch.zeros(64, dtype=torch.float64)
    for i in range(repeats + 20):
        comm.barrier()
        t0 = time.perf_counter()
        comm.allreduce_(small)
        if i >= 20:
            lat.append(time.perf_counter() - t0)
    model = build_model(load_config(config, overrides))
    grads = [torch.zeros_like(p) for p in model.parameters() if p.requires_grad]
    numel = sum(g.numel() for g in grads)
    bw = []
    for i in range(12):
        comm.barrier()
        t0 = time.perf_counter()
        comm.allreduce_coalesced_(grads)
        if i >= 2:
            bw.append(time.perf_counter() - t0)
    n = comm.size
    t_small, t_big = statistics.median(lat), statistics.median(bw)
    alpha = t_small / (2 * (n - 1))
    bandwidth = 2 * (n - 1) / n * numel * 4 / max(t_big - 2 * (n - 1) * alpha, 1e-9)
    if comm.rank == 0:
        out.write_text(json.dumps({"backend": comm.name, "size": n, "small_allreduce_s": t_small,
                                   "gradient_allreduce_s": t_big, "gradient_tensors": len(grads),
                                   "gradient_elements": numel, "alpha_s": alpha, "bandwidth_Bps": bandwidth}))  # fmt: skip
    distributed.shutdown()


def step(out: Path, config: str, overrides: list[str], iters: int = 12) -> None:
    from megdet_hpc import distributed
    from megdet_hpc.config import load_config
    from megdet_hpc.engine import Trainer

    comm = distributed.init()
    tmp = Path(tempfile.mkdtemp())
    cfg = load_config(config, [*overrides, f"train.output_dir={tmp}", "train.checkpoint_period=0",
                               "data.num_workers=0", "train.tensorboard=false", "train.threads=1"])  # fmt: skip
    trainer = Trainer(cfg, resume=False)
    data = iter(trainer.loader)
    times = []
    for i in range(iters + 3):
        comm.barrier()
        t0 = time.perf_counter()
        trainer.train_step(data)
        if i >= 3:
            times.append(time.perf_counter() - t0)
    if comm.rank == 0:
        out.write_text(json.dumps({"size": comm.size, "s_per_iter": statistics.median(times),
                                   "images_per_gpu": trainer.batch.images_per_gpu}))  # fmt: skip
    distributed.shutdown()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--collectives", type=Path)
    p.add_argument("--step", type=Path)
    p.add_argument("--config")
    p.add_argument("opts", nargs="*")
    a = p.parse_args(argv)
    if a.collectives:
        collectives(a.collectives, a.config, a.opts)
    if a.step:
        step(a.step, a.config, a.opts)
    return 0


if __name__ == "__main__":
    sys.exit(main())
