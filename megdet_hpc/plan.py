"""``python -m megdet_hpc.plan --config C [--gpus 1 8 16 32 64 128] [--preset P | --calibrate]``

Predicts per-iteration time, images/s, scaling efficiency and time-to-train of a config's schedule on
1..N GPUs (``megdet_hpc.perf.cost_model``), prints a table and writes a PNG.  ``--calibrate`` measures
this machine instead of using a preset: allreduce latency/bandwidth through real processes (mpirun), the
1-process training-step time of the config, and -- to validate the model -- the real 2-process step
time, which it compares with the prediction.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

from megdet_hpc.config import ConfigError, load_config
from megdet_hpc.perf.cost_model import PRESETS, Link, Machine, Workload, as_dict, predict


def workload(cfg) -> Workload:  # type: ignore[no-untyped-def]
    from megdet_hpc.layers import CrossGPUBatchNorm2d
    from megdet_hpc.modeling import build_model

    model = build_model(cfg)
    params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    channels = tuple(m.num_features for m in model.modules() if isinstance(m, CrossGPUBatchNorm2d))
    return Workload(cfg.data.images_per_gpu, params, channels, cfg.solver.max_iter * cfg.solver.total_batch,
                    2 if cfg.solver.fp16_compression else 4, cfg.model.bn_group_size)  # fmt: skip


def _launch(launcher: str, n: int, argv: list[str]) -> dict:
    from megdet_hpc.launch.local import local_command, local_env

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "r.json"
        env = local_env(launcher)
        cmd = local_command(launcher, n, ["-m", "megdet_hpc.perf.calibrate", *argv[:1], str(out), *argv[1:]])
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1200)
        if proc.returncode != 0:
            raise RuntimeError(f"calibration run failed:\n{proc.stderr[-2000:]}")
        return json.loads(out.read_text())


def calibrate(
    config: str, opts: list[str], images_per_gpu: int, launcher: str = "mpirun"
) -> tuple[Machine, dict]:
    """Measure with real processes under ``launcher``: collectives (2 ranks: latency and the gradient
    allreduce), the 1-process step, and the real 2-process step (CGBN over both ranks) that validates
    the prediction."""
    coll = _launch(launcher, 2, ["--collectives", "--config", config, *opts])
    one = _launch("single", 1, ["--step", "--config", config, *opts, f"solver.total_batch={images_per_gpu}",
                                f"data.images_per_gpu={images_per_gpu}"])  # fmt: skip
    two = _launch(launcher, 2, ["--step", "--config", config, *opts, f"solver.total_batch={2 * images_per_gpu}",
                                f"data.images_per_gpu={images_per_gpu}"])  # fmt: skip
    link = Link(coll["alpha_s"], coll["bandwidth_Bps"])
    machine = Machine(f"this machine (calibrated, {launcher})", one["s_per_iter"] / one["images_per_gpu"],
                      gpus_per_node=os.cpu_count() or 2, intra=link, inter=link, overlap=0.0)  # fmt: skip
    return machine, {"launcher": launcher, "collectives": coll, "step_1": one, "step_2": two}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="megdet_hpc.plan", description="Plan a MegDet job from 1 to N GPUs")
    p.add_argument("--config", required=True)
    p.add_argument("--gpus", type=int, nargs="+", default=[1, 8, 16, 32, 64, 128])
    p.add_argument("--preset", choices=sorted(PRESETS), default="h100-ib100")
    p.add_argument("--compute-s-per-image", type=float, help="override the preset's compute time")
    p.add_argument("--calibrate", action="store_true", help="measure this machine (real processes)")
    p.add_argument(
        "--launcher",
        choices=["mpirun", "hvd-mpi", "hvd-gloo", "torchrun"],
        default="mpirun",
        help="launcher (and so comm backend) of the calibration runs",
    )
    p.add_argument("--images-per-gpu", type=int)
    p.add_argument("--out", type=Path, default=Path("plan"))
    p.add_argument("opts", nargs="*")
    a = p.parse_args(argv)
    try:
        cfg = load_config(a.config, a.opts)
    except ConfigError as exc:
        print(f"megdet_hpc.plan: error: {exc}", file=sys.stderr)
        return 2
    if any(g < 1 for g in a.gpus):
        print("megdet_hpc.plan: error: --gpus values must be >= 1", file=sys.stderr)
        return 2
    if a.images_per_gpu:
        cfg.data.images_per_gpu = a.images_per_gpu
    work = workload(cfg)
    extra: dict = {}
    if a.calibrate:
        machine, extra = calibrate(a.config, a.opts, cfg.data.images_per_gpu, a.launcher)
    else:
        machine = PRESETS[a.preset]
    if a.compute_s_per_image:
        machine = replace(machine, compute_s_per_image=a.compute_s_per_image)
    preds = [predict(machine, work, g) for g in a.gpus]
    print(f"machine: {machine.name}; {work.params / 1e6:.1f}M parameters, {len(work.bn_channels)} CGBN layers, "
          f"{work.images_per_gpu} image(s)/GPU, schedule {work.total_images:,} images")  # fmt: skip
    print(f"{'GPUs':>5} {'iter s':>8} {'compute':>8} {'CGBN':>8} {'grad':>8} {'exposed':>8} {'img/s':>9} "
          f"{'eff':>6} {'iters':>8} {'time-to-train':>14}")  # fmt: skip
    for r in preds:
        print(f"{r.gpus:>5} {r.iter_s:8.3f} {r.compute_s:8.3f} {r.cgbn_s:8.4f} {r.grad_s:8.4f} "
              f"{r.grad_exposed_s:8.4f} {r.images_per_s:9.1f} {r.efficiency:6.3f} {r.iterations:>8} "
              f"{r.time_to_train_h:12.2f} h")  # fmt: skip
    if a.calibrate:
        pred2 = predict(machine, work, 2)
        meas2 = extra["step_2"]["s_per_iter"]
        err = pred2.iter_s / meas2 - 1
        extra["validation"] = {"predicted_2_s": pred2.iter_s, "measured_2_s": meas2, "error": err}
        print(f"\nvalidation: 2 processes predicted {pred2.iter_s:.3f} s/iter, measured {meas2:.3f} s/iter "
              f"({100 * err:+.1f}%)")  # fmt: skip
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "plan.json").write_text(json.dumps({"machine": machine.name, "predictions": [as_dict(r) for r in preds],
                                                 **extra}, indent=2))  # fmt: skip
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
    fig.suptitle(f"{Path(a.config).name} on {machine.name}")
    fig.tight_layout()
    fig.savefig(a.out / "plan.png", dpi=110)
    print(f"wrote {a.out / 'plan.json'} and {a.out / 'plan.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
