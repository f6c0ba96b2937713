"""Measure this machine's collectives and training step with real processes (run by the planner).

``python -m megdet_hpc.perf.calibrate --collectives --config C`` (under mpirun/horovodrun) times a
512 B allreduce (latency) and the config's gradient allreduce (bandwidth) through the launcher's comm
backend; ``--step --config C`` times ``SimpleTrainer.run_step`` of a config at any world size.  Rank 0
reports through ``launch.local.write_report``; ``calibrate`` runs both and returns a ``Machine``.
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time
from typing import TYPE_CHECKING, Any

from megdet_hpc.launch.local import run_and_collect, write_report
from megdet_hpc.perf.cost_model import Link, Machine
from megdet_hpc.utils.cli import ArgumentParser, run_cli

if TYPE_CHECKING:  # the planner imports this module without torch
    from megdet_hpc.distributed import Comm


def measure_collectives(comm: Comm, config: str, overrides: list[str], repeats: int = 200) -> None:
    """Latency from a 512 B allreduce; bandwidth from the gradient allreduce the trainer really issues
    (``Comm.allreduce_coalesced_`` over tensors shaped like the config's trainable parameters)."""
    import torch

    from megdet_hpc.config import load_config
    from megdet_hpc.modeling import build_model

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
    if comm.is_main:
        write_report(
            0,
            {
                "backend": comm.name,
                "size": n,
                "small_allreduce_s": t_small,
                "gradient_allreduce_s": t_big,
                "gradient_tensors": len(grads),
                "gradient_elements": numel,
                "alpha_s": alpha,
                "bandwidth_Bps": bandwidth,
            },
        )


TIMING_OVERRIDES = [
    "train.checkpoint_period=0",
    "train.checkpoint_minutes=0",
    "train.eval_at_end=false",
    "train.eval_period=0",
    "train.tensorboard=false",
]


def measure_step(comm: Comm, config: str, overrides: list[str], iters: int = 12) -> None:
    from megdet_hpc.config import load_config
    from megdet_hpc.engine.defaults import build_run, configure_process

    with tempfile.TemporaryDirectory(prefix="megdet-timing-") as out:  # a lock file, nothing to keep
        timing = [
            *overrides,
            "data.num_workers=0",
            "train.threads=1",
            *TIMING_OVERRIDES,
            f"train.output_dir={out}",
        ]
        run = build_run(load_config(config, timing), comm, resume=False)
        try:
            configure_process(run.cfg, run.device)
            times = time_steps(comm, run.trainer, iters)
        finally:
            run.close()
    if comm.is_main:
        write_report(
            0,
            {
                "size": comm.size,
                "s_per_iter": statistics.median(times),
                "images_per_gpu": run.trainer.batch.images_per_gpu,
            },
        )


def time_steps(comm: Comm, trainer: Any, iters: int) -> list[float]:
    """Seconds of each of ``iters`` training steps, after 3 untimed ones, every step started together."""
    times = []
    for i in range(iters + 3):
        comm.barrier()
        t0 = time.perf_counter()
        trainer.run_step()
        if i >= 3:
            times.append(time.perf_counter() - t0)
    return times


def calibrate(
    config: str, opts: list[str], images_per_gpu: int, launcher: str = "mpirun", steps: int = 12
) -> tuple[Machine, dict]:
    """Measure with real processes under ``launcher``: collectives (2 ranks: latency and the gradient
    allreduce), the 1-process step, and the real 2-process step (CGBN over both ranks) that validates
    the prediction."""
    me = ["-m", "megdet_hpc.perf.calibrate"]

    def collect(launch: str, n: int, *args: str) -> dict:
        return run_and_collect(launch, n, [*me, *args], timeout=1200).reports[0]

    coll = collect(launcher, 2, "--collectives", "--config", config, *opts)
    layout = [f"data.images_per_gpu={images_per_gpu}"]
    step = ["--step", "--steps", str(steps), "--config", config, *opts]
    one = collect("single", 1, *step, f"solver.total_batch={images_per_gpu}", *layout)
    two = collect(launcher, 2, *step, f"solver.total_batch={2 * images_per_gpu}", *layout)
    link = Link(coll["alpha_s"], coll["bandwidth_Bps"])
    machine = Machine(
        f"this machine (calibrated, {launcher})",
        one["s_per_iter"] / one["images_per_gpu"],
        gpus_per_node=os.cpu_count() or 2,
        intra=link,
        inter=link,
        overlap=0.0,
    )
    return machine, {"launcher": launcher, "collectives": coll, "step_1": one, "step_2": two}


def main(argv: list[str] | None = None) -> int:
    p = ArgumentParser(
        prog="megdet_hpc.perf.calibrate", description="Calibration worker (run by the planner)"
    )
    p.add_argument("--collectives", action="store_true")
    p.add_argument("--step", action="store_true")
    p.add_argument("--steps", type=int, default=12, help="timed steps of --step (after 3 untimed ones)")
    p.add_argument("--config", required=True)
    p.add_argument("opts", nargs="*")
    a = p.parse(argv)

    def measure(comm: Comm) -> int:
        if a.collectives:
            measure_collectives(comm, a.config, a.opts)
        if a.step:
            measure_step(comm, a.config, a.opts, iters=a.steps)
        return 0

    def _run() -> int:
        from megdet_hpc import distributed

        return distributed.run_with_comm(measure)

    return run_cli(_run, "megdet_hpc.perf.calibrate")


if __name__ == "__main__":
    sys.exit(main())
