"""``python -m megdet_hpc.plan --config C [--gpus 1 8 16 32 64 128] [--preset P | --calibrate]``

The planner: per-iteration time, images/s, scaling efficiency and time-to-train of a config's
schedule on 1..N GPUs (``megdet_hpc.perf.cost_model``); a table, JSON and a PNG.

* ``--preset h100-ib100`` (default) takes its compute time per image from the measured GPU step in
  ``--measurements PATH`` (a ``bash bench/gpu.sh`` result, e.g. a checkout's ``bench/results/gpu.json``)
  when given -- a missing file is an error; the preset's typed-in constant otherwise (the output says
  which).  The package never looks for a repository of its own.
* ``--calibrate`` measures this machine with real processes instead: allreduce latency/bandwidth, the
  1-process step of the config, and -- to validate the model -- the real 2-process step, which it
  compares with the prediction.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

from megdet_hpc.launch.names import MPIRUN, MULTI_PROCESS_METHODS
from megdet_hpc.perf.cost_model import PRESETS, Machine, Workload, as_dict, predict
from megdet_hpc.utils.cli import ArgumentParser, run_cli
from megdet_hpc.utils.errors import UserError

GPU_PRESETS = ("h100-ib100",)


def workload(cfg) -> Workload:  # type: ignore[no-untyped-def]
    from megdet_hpc.layers import CrossGPUBatchNorm2d
    from megdet_hpc.modeling import build_model

    model = build_model(cfg)
    params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    channels = tuple(m.num_features for m in model.modules() if isinstance(m, CrossGPUBatchNorm2d))
    return Workload(
        cfg.data.images_per_gpu,
        params,
        channels,
        cfg.solver.max_iter * cfg.solver.total_batch,
        2 if cfg.solver.fp16_compression else 4,
        cfg.model.bn_group_size,
    )


def measured_gpu_compute(path: Path) -> tuple[float, str]:
    """Seconds per image of the measured ``SimpleTrainer`` step in a ``bench/gpu.sh`` result, and its source."""
    if not path.is_file():
        raise UserError(
            f"--measurements {path} does not exist (a bench/gpu.sh result, e.g. bench/results/gpu.json)"
        )
    try:
        data = json.loads(path.read_text())
        row = next(r for r in data["step"] if r["contender"] == "SimpleTrainer.run_step")
        return row["s_per_iter"] / row["images"], f"{data['env']['device']}, {path.name}"
    except (ValueError, KeyError, StopIteration, TypeError) as exc:
        raise UserError(f"{path}: not a bench/gpu.sh result ({type(exc).__name__})") from exc


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog="megdet_hpc.plan", description="Plan a MegDet job from 1 to N GPUs")
    p.add_argument("--config", required=True)
    p.add_argument("--gpus", type=int, nargs="+", default=[1, 8, 16, 32, 64, 128])
    p.add_argument("--preset", choices=sorted(PRESETS), default="h100-ib100")
    p.add_argument("--measurements", type=Path, help="measured GPU step: a bench/gpu.sh result (gpu.json)")
    p.add_argument("--gpu-json", dest="measurements", type=Path, help=argparse.SUPPRESS)  # the old name
    p.add_argument("--compute-s-per-image", type=float, help="override the compute time per image")
    p.add_argument("--calibrate", action="store_true", help="measure this machine (real processes)")
    p.add_argument(
        "--launcher",
        choices=MULTI_PROCESS_METHODS,
        default=MPIRUN,
        help="launch method (and so comm backend) of the calibration runs, as launch local --launcher",
    )
    p.add_argument(
        "--calibrate-steps",
        type=int,
        default=12,
        help="timed training steps per calibration run (after 3 untimed ones; fewer: quicker, noisier)",
    )
    p.add_argument("--images-per-gpu", type=int)
    p.add_argument("--out", type=Path, default=Path("plan"))
    p.add_argument("opts", nargs="*")
    return p


def plan(a) -> int:  # type: ignore[no-untyped-def]
    from megdet_hpc.config import load_config, updated

    cfg = load_config(a.config, a.opts)
    if any(g < 1 for g in a.gpus):
        raise UserError("--gpus values must be >= 1")
    if a.images_per_gpu is not None:
        if a.images_per_gpu < 1:
            raise UserError("--images-per-gpu must be >= 1")
        cfg = updated(cfg, {"data": {"images_per_gpu": a.images_per_gpu}})
    work = workload(cfg)
    extra: dict[str, Any] = {}
    if a.calibrate:
        from megdet_hpc.perf.calibrate import calibrate

        if a.calibrate_steps < 1:
            raise UserError("--calibrate-steps must be >= 1")
        machine, extra = calibrate(
            a.config, a.opts, cfg.data.images_per_gpu, a.launcher, steps=a.calibrate_steps
        )
    else:
        machine = PRESETS[a.preset]
        measured = None
        if a.measurements is not None:
            if a.preset not in GPU_PRESETS:
                raise UserError(f"--measurements replaces the compute time of {', '.join(GPU_PRESETS)} only")
            measured = measured_gpu_compute(a.measurements)
        if measured is not None:
            machine = replace(
                machine,
                compute_s_per_image=measured[0],
                name=f"{machine.name} (compute measured: {measured[1]})",
            )
            extra["compute_source"] = str(a.measurements)
        else:
            extra["compute_source"] = "preset constant"
    if a.compute_s_per_image:
        machine = replace(machine, compute_s_per_image=a.compute_s_per_image)
        extra["compute_source"] = "--compute-s-per-image"
    preds = [predict(machine, work, g) for g in a.gpus]
    print(
        f"machine: {machine.name}; {work.params / 1e6:.1f}M parameters, {len(work.bn_channels)} CGBN layers, "
        f"{work.images_per_gpu} image(s)/GPU, schedule {work.total_images:,} images"
    )
    print(
        f"{'GPUs':>5} {'iter s':>8} {'compute':>8} {'CGBN':>8} {'grad':>8} {'exposed':>8} {'img/s':>9} "
        f"{'eff':>6} {'iters':>8} {'time-to-train':>14}"
    )
    for r in preds:
        print(
            f"{r.gpus:>5} {r.iter_s:8.3f} {r.compute_s:8.3f} {r.cgbn_s:8.4f} {r.grad_s:8.4f} "
            f"{r.grad_exposed_s:8.4f} {r.images_per_s:9.1f} {r.efficiency:6.3f} {r.iterations:>8} "
            f"{r.time_to_train_h:12.2f} h"
        )
    if a.calibrate:
        pred2 = predict(machine, work, 2)
        meas2 = extra["step_2"]["s_per_iter"]
        err = pred2.iter_s / meas2 - 1
        extra["validation"] = {"predicted_2_s": pred2.iter_s, "measured_2_s": meas2, "error": err}
        print(
            f"\nvalidation: 2 processes predicted {pred2.iter_s:.3f} s/iter, measured {meas2:.3f} s/iter "
            f"({100 * err:+.1f}%)"
        )
    a.out.mkdir(parents=True, exist_ok=True)
    from megdet_hpc.utils.provenance import environment

    payload = {
        "machine": machine.name,
        "predictions": [as_dict(r) for r in preds],
        **extra,
        "env": environment(),
    }
    (a.out / "plan.json").write_text(json.dumps(payload, indent=2))
    _plot(a, preds, machine)
    print(f"wrote {a.out / 'plan.json'} and {a.out / 'plan.png'}")
    return 0


def _plot(a, preds, machine: Machine) -> None:  # type: ignore[no-untyped-def]
    from megdet_hpc.utils.plotting import pyplot, save

    plt = pyplot()

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.8))
    ax1.plot(a.gpus, [r.time_to_train_h for r in preds], "o-")
    ax1.set_xscale("log", base=2)
    ax1.set_yscale("log")
    ax1.set_xlabel("GPUs")
    ax1.set_ylabel("time to train (h)")
    ax2.plot(a.gpus, [r.efficiency for r in preds], "o-")
    ax2.set_xscale("log", base=2)
    ax2.set_ylim(0, 1.05)
    ax2.set_xlabel("GPUs")
    ax2.set_ylabel("scaling efficiency")
    fig.suptitle(f"{Path(a.config).name} on {machine.name}", fontsize=9)
    save(fig, a.out / "plan.png")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse(argv)
    return run_cli(lambda: plan(args), "megdet_hpc.plan")


if __name__ == "__main__":
    sys.exit(main())
