"""``python -m megdet_hpc.experiments.megdet_table``: MegDet's table as an experiment anyone can rerun.

MegDet's claim: as the mini-batch grows, plain per-GPU BN and no warmup lose accuracy, while CGBN with a
large enough BN size plus the warmup policy keeps it.  Here, at toy scale on the embedded data (the demo
detector, ResNet-18 FPN at 128 px), every run sees the same number of images with the LR from one base
by the linear scaling rule (``base_lr x total / 4``, ``--base-lr``, default 0.01), on CPU under ``mpirun`` (oversubscribed ranks, one
thread each):

| run | ranks x images | total batch | BN | BN size | warmup |
|---|---|---|---|---|---|
| baseline (seeds 0 and 1) | 2 x 2 | 4 | CGBN | 4 | yes |
| large, local BN | 8 x 2 | 16 | per-rank BN | 2 | yes |
| large, CGBN group 2 / 4 | 8 x 2 | 16 | CGBN in groups | 4 / 8 | yes |
| large, CGBN all | 8 x 2 | 16 | CGBN | 16 | yes |
| large, no warmup | 8 x 2 | 16 | CGBN | 16 | no |

Each run trains in its own folder under ``--out`` and is resumable: a run that finished is skipped, an
interrupted one resumes from its last checkpoint (time-based, every few minutes).  The results --
``megdet_table.md`` (batch, BN size, LR, warmup, AP, AP50, wall time, images/s), ``megdet_table.json``
and the plots (AP vs BN size, loss curves, LR curves) -- go to ``--results``.
"""

from __future__ import annotations

import json
import re
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from megdet_hpc.utils.cli import EXIT_NONFINITE, EXIT_OK, ArgumentParser, run_cli
from megdet_hpc.utils.errors import UserError

REPO = Path(__file__).resolve().parents[2]
BASE_LR, BASE_BATCH = 0.01, 4
WARMUP_ITERS = 200  # at the base batch: 800 images for every run


@dataclass(frozen=True)
class Run:
    name: str
    ranks: int
    images_per_gpu: int
    bn: str  # "cgbn" | "bn"
    bn_group: int  # 0 = all ranks
    warmup: bool
    seed: int = 0

    @property
    def total_batch(self) -> int:
        return self.ranks * self.images_per_gpu

    @property
    def bn_size(self) -> int:
        """Images one BN layer normalises over."""
        if self.bn == "bn":
            return self.images_per_gpu
        return (self.bn_group or self.ranks) * self.images_per_gpu

    def lr(self, base_lr: float) -> float:
        return base_lr * self.total_batch / BASE_BATCH


RUNS = (
    Run("baseline", 2, 2, "cgbn", 0, True),
    Run("baseline, seed 1", 2, 2, "cgbn", 0, True, seed=1),
    Run("large, local BN", 8, 2, "bn", 0, True),
    Run("large, CGBN group 2", 8, 2, "cgbn", 2, True),
    Run("large, CGBN group 4", 8, 2, "cgbn", 4, True),
    Run("large, CGBN all", 8, 2, "cgbn", 0, True),
    Run("large, no warmup", 8, 2, "cgbn", 0, False),
)


def slug(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name.lower()).strip("_").replace("__", "_")


@dataclass
class Outcome:
    run: dict[str, Any]
    status: str = "pending"  # done | diverged | failed
    exit_code: int | None = None
    wall_s: float = 0.0
    AP: float | None = None
    AP50: float | None = None
    images_per_s: float | None = None
    diverged_at: int | None = None  # first non-finite iteration
    curves: dict[str, list[float]] = field(default_factory=dict)


def train_command(
    run: Run, images: int, folder: Path, data: Path, config: Path, base_lr: float
) -> tuple[list[str], dict[str, str]]:
    from megdet_hpc.launch.local import local_command, local_env

    iters_at_base = images // BASE_BATCH
    overrides = [
        f"train.output_dir={folder}",
        f"train.seed={run.seed}",
        f"model.norm={run.bn}",
        f"model.bn_group_size={run.bn_group}",
        f"data.images_per_gpu={run.images_per_gpu}",
        "data.num_workers=0",
        f"data.train_images={data}/train",
        f"data.train_annotations={data}/annotations/instances_train.json",
        f"data.val_images={data}/val",
        f"data.val_annotations={data}/annotations/instances_val.json",
        f"solver.base_lr={base_lr}",
        f"solver.base_batch={BASE_BATCH}",
        f"solver.total_batch={BASE_BATCH}",  # the schedule is written at batch 4 ...
        f"solver.max_iter={iters_at_base}",
        f"solver.steps=[{int(0.8 * iters_at_base)}]",
        f"solver.warmup_iters={WARMUP_ITERS if run.warmup else 0}",
        "train.checkpoint_period=0",
        "train.checkpoint_minutes=5",
        "train.keep_checkpoints=1",
        "train.log_period=10",
        "train.tensorboard=false",
        "eval.vis_images=4",
    ]
    argv = [
        "-m",
        "megdet_hpc.train",
        "--config",
        str(config),
        "--total-batch",
        str(run.total_batch),
        *overrides,
    ]
    launcher = "mpirun" if run.ranks > 1 else "single"  # ... and rescaled in images to the run's batch
    # Oversubscribed ranks must yield while they wait in MPI, or pollers starve the ranks computing.
    env = local_env(launcher, {"OMPI_MCA_mpi_yield_when_idle": "1", "MEGDET_COMM": "mpi"})
    return local_command(launcher, run.ranks, argv), env


def read_outcome(run: Run, folder: Path, state: dict[str, Any]) -> Outcome:
    out = Outcome(
        asdict(run), state.get("status", "pending"), state.get("exit_code"), state.get("wall_s", 0.0)
    )
    log = folder / "stdout.log"
    if out.status == "diverged" and log.is_file():
        found = re.search(r"non-finite loss or gradient at iteration (\d+)", log.read_text(errors="replace"))
        out.diverged_at = int(found.group(1)) if found else None
    metrics = folder / "eval" / "metrics.json"
    if out.status == "done" and metrics.is_file():
        m = json.loads(metrics.read_text())
        out.AP, out.AP50 = m["AP"], m["AP50"]
    rows = []
    if (folder / "metrics.jsonl").is_file():
        rows = [
            json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines() if line.strip()
        ]
    train = [r for r in rows if "lr" in r and "AP" not in r]
    if train:
        out.images_per_s = statistics.median(r["images_per_s"] for r in train[len(train) // 5 :] or train)
        out.curves = {
            "images_seen": [r["images_seen"] for r in train],
            "loss": [r.get("loss", float("nan")) for r in train],  # NaN: a skipped (non-finite) step
            "lr": [r["lr"] for r in train],
        }
    return out


def execute(run: Run, images: int, out: Path, data: Path, config: Path, base_lr: float) -> dict[str, Any]:
    """Train (or resume) one run; returns its bookkeeping (status, exit code, accumulated wall time)."""
    folder = out / slug(run.name)
    folder.mkdir(parents=True, exist_ok=True)
    state_file = folder / "experiment.json"
    state = json.loads(state_file.read_text()) if state_file.is_file() else {}
    if state.get("status") in ("done", "diverged"):
        print(f"[megdet_table] {run.name}: {state['status']} earlier, skipped", flush=True)
        return state
    command, env = train_command(run, images, folder, data, config, base_lr)
    print(
        f"[megdet_table] {run.name}: {run.ranks} x {run.images_per_gpu}, BN size {run.bn_size}, lr {run.lr(base_lr):g}"
        f"{'' if run.warmup else ', no warmup'} -> {folder}",
        flush=True,
    )
    start = time.perf_counter()
    with open(folder / "stdout.log", "a") as log:
        code = subprocess.run(command, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=REPO).returncode
    state["wall_s"] = state.get("wall_s", 0.0) + time.perf_counter() - start
    state["exit_code"] = code
    state["status"] = "done" if code == EXIT_OK else "diverged" if code == EXIT_NONFINITE else "failed"
    state_file.write_text(json.dumps(state))
    print(
        f"[megdet_table] {run.name}: {state['status']} (exit {code}) after {state['wall_s']:.0f} s",
        flush=True,
    )
    return state


def fmt(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _lr_at(outcome: Outcome, iteration: int, images: int, base_lr: float) -> float:
    """The LR of a run's schedule for the step after ``iteration`` steps (what the trainer set)."""
    from megdet_hpc.solver import LRSchedule

    r = Run(**outcome.run)
    schedule = LRSchedule(
        base_lr=base_lr,
        base_batch=BASE_BATCH,
        reference_batch=BASE_BATCH,
        warmup_factor=0.001,
        warmup_images=WARMUP_ITERS * BASE_BATCH if r.warmup else 0,
        step_images=(int(0.8 * images // BASE_BATCH) * BASE_BATCH,),
        gamma=0.1,
        max_images=images,
    )
    return schedule.lr(iteration * r.total_batch, r.total_batch)


def markdown(outcomes: list[Outcome], images: int, base_lr: float) -> str:
    lines = [
        f"Every run: {images} training images seen (demo detector, ResNet-18 FPN, 128 px, embedded data); "
        f"LR = {base_lr:g} x total batch / {BASE_BATCH}; evaluation on the 100 validation images.",
        "",
        "| run | ranks x images | total batch | BN | BN size | LR | warmup | AP | AP50 | wall time (s) | images/s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for o in outcomes:
        r = Run(**o.run)
        bn = "per-rank BN" if r.bn == "bn" else ("CGBN" if not r.bn_group else f"CGBN, group {r.bn_group}")
        ap = fmt(o.AP) if o.status == "done" else o.status
        if o.diverged_at is not None:
            ap += f" at iteration {o.diverged_at} (LR {_lr_at(o, o.diverged_at, images, base_lr):.3g})"
        lines.append(
            f"| {r.name} | {r.ranks} x {r.images_per_gpu} | {r.total_batch} | {bn} | {r.bn_size} | {r.lr(base_lr):g} | "
            f"{'yes' if r.warmup else 'no'} | {ap} | {fmt(o.AP50) if o.status == 'done' else '-'} | "
            f"{o.wall_s:.0f} | {fmt(o.images_per_s, 1)} |"
        )
    return "\n".join(lines) + "\n"


def plots(outcomes: list[Outcome], folder: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    fig, ax = plt.subplots(figsize=(6, 3.8))
    large = [
        o for o in outcomes if Run(**o.run).total_batch == 16 and Run(**o.run).warmup and o.AP is not None
    ]
    large.sort(key=lambda o: Run(**o.run).bn_size)
    ax.plot([Run(**o.run).bn_size for o in large], [o.AP for o in large], "o-", label="batch 16, warmup")
    base = [o for o in outcomes if Run(**o.run).total_batch == 4 and o.AP is not None]
    ax.scatter(
        [Run(**o.run).bn_size for o in base],
        [o.AP for o in base],
        marker="s",
        color="C2",
        label="batch 4 (baseline, 2 seeds)",
        zorder=3,
    )
    measured = [o.AP for o in outcomes if o.AP is not None]
    bottom = min(measured) - 0.05 if measured else 0.0
    for o in outcomes:  # diverged runs at the bottom edge, marked
        r = Run(**o.run)
        if o.AP is None and o.status == "diverged":
            label = f"batch {r.total_batch}{'' if r.warmup else ', no warmup'}: diverged"
            ax.scatter([r.bn_size], [bottom + 0.01], marker="x", color="C3", s=60, label=label, zorder=3)
    if measured:
        ax.set_ylim(bottom, max(measured) + 0.03)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("BN size (images per BN statistic)")
    ax.set_ylabel("COCO AP (val)")
    ax.set_title("AP vs BN size at equal images seen")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    paths.append(folder / "megdet_table_ap_vs_bn_size.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    for key, title, log in (("loss", "training loss", True), ("lr", "learning rate", False)):
        fig, ax = plt.subplots(figsize=(7, 4))
        for o in outcomes:
            if o.curves:
                ax.plot(o.curves["images_seen"], o.curves[key], label=o.run["name"], lw=1)
        if log:
            ax.set_yscale("log")
        ax.set_xlabel("images seen")
        ax.set_title(f"{title} per run")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        paths.append(folder / f"megdet_table_{key}.png")
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)
    return paths


def main(argv: list[str] | None = None) -> int:
    p = ArgumentParser(prog="megdet_hpc.experiments.megdet_table", description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=4800, help="training images per run")
    p.add_argument(
        "--base-lr", type=float, default=BASE_LR, help=f"LR at batch {BASE_BATCH}, scaled linearly"
    )
    p.add_argument("--out", type=Path, default=Path("output/experiments/megdet_table"), help="run folders")
    p.add_argument("--results", type=Path, default=REPO / "experiments" / "results", help="table and plots")
    p.add_argument("--only", nargs="*", default=[], help="run names to (re)run; default: all")
    p.add_argument("--data", type=Path, default=Path("datasets/synthetic"))
    a = p.parse(argv)

    def _run() -> int:
        from megdet_hpc.data.synthetic import generate

        if a.images < 16 * 10:
            raise UserError("--images must be >= 160 (10 steps of the largest batch)")
        unknown = set(a.only) - {r.name for r in RUNS}
        if unknown:
            raise UserError(f"unknown run {sorted(unknown)[0]!r}; runs: {', '.join(r.name for r in RUNS)}")
        data = generate(a.data.resolve(), 400, 100, 128, 0)
        config = REPO / "configs" / "demo_cpu.yaml"
        out = a.out.resolve()
        states = {}
        for run in RUNS:
            if a.only and run.name not in a.only:
                continue
            states[run.name] = execute(run, a.images, out, data, config, a.base_lr)
        outcomes = []
        for run in RUNS:
            folder = out / slug(run.name)
            state_file = folder / "experiment.json"
            state = json.loads(state_file.read_text()) if state_file.is_file() else {}
            outcomes.append(read_outcome(run, folder, state))
        a.results.mkdir(parents=True, exist_ok=True)
        table = markdown(outcomes, a.images, a.base_lr)
        (a.results / "megdet_table.md").write_text(table)
        from megdet_hpc.utils.provenance import environment

        summary = {
            "images": a.images,
            "base_lr": a.base_lr,
            "env": environment(),
            "runs": [asdict(o) for o in outcomes],
        }
        (a.results / "megdet_table.json").write_text(json.dumps(summary, indent=1))
        written = plots(outcomes, a.results)
        print(table)
        print("wrote", a.results / "megdet_table.md", *written)
        return 0 if all(o.status in ("done", "diverged") for o in outcomes) else 1

    return run_cli(_run, "megdet_hpc.experiments.megdet_table")


if __name__ == "__main__":
    sys.exit(main())
