"""``python -m megdet_hpc.experiments.megdet_table``: MegDet's table as an experiment anyone can rerun.

MegDet's claim: as the mini-batch grows, plain per-GPU BN and no warmup lose accuracy, while CGBN with a
large enough BN size plus the warmup policy keeps it.  Here, at toy scale on the embedded data (the demo
detector, ResNet-18 FPN at 128 px), every run sees the same number of images with the LR from one base
by the linear scaling rule (``base_lr x total / 4``, ``--base-lr``, default 0.01), on CPU under ``mpirun`` (oversubscribed ranks, one
thread each):

| run | ranks x images | total batch | BN | BN size | warmup | seeds |
|---|---|---|---|---|---|---|
| baseline | 2 x 2 | 4 | CGBN | 4 | yes | 0, 1 |
| large, local BN | 8 x 2 | 16 | per-rank BN | 2 | yes | 0, 1 |
| large, CGBN group 2 / 4 | 8 x 2 | 16 | CGBN in groups | 4 / 8 | yes | 0, 1 |
| large, CGBN all | 8 x 2 | 16 | CGBN | 16 | yes | 0, 1 |
| large, no warmup | 8 x 2 | 16 | CGBN | 16 | no | 0, 1 |
| noisy BN, local BN | 8 x 1 | 8 | per-rank BN | 1 | yes | 0, 1 |
| noisy BN, CGBN all | 8 x 1 | 8 | CGBN | 8 | yes | 0, 1 |

The "noisy BN" pair is where per-rank BN should hurt: one image per rank, so local BN normalises every
layer over a single image, while CGBN normalises over all 8 -- at the same LR (0.02) and batch.

Each run trains in its own folder under ``--out`` and is resumable: a run that finished is skipped, an
interrupted one resumes from its last checkpoint (time-based, every few minutes).  The results --
``megdet_table.md`` (one row per configuration with the mean +- seed standard deviation of AP and AP50,
then every run: batch, BN size, LR, warmup, AP, AP50, wall time, images/s), ``megdet_table.json`` and
the plots (AP vs BN size with the seed spread as error bars, loss curves, LR curves) -- go to
``--results``.  Runs recorded in an earlier ``megdet_table.json`` there (same images and base LR) are
finished runs too: they are kept, marked with the commit that ran them, and not rerun unless named by
``--only`` (their run folders need not be on this machine).
"""

from __future__ import annotations

import json
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from megdet_hpc.utils.cli import EXIT_NONFINITE, EXIT_OK, ArgumentParser, run_cli
from megdet_hpc.utils.errors import UserError

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


LARGE = (
    Run("large, local BN", 8, 2, "bn", 0, True),
    Run("large, CGBN group 2", 8, 2, "cgbn", 2, True),
    Run("large, CGBN group 4", 8, 2, "cgbn", 4, True),
    Run("large, CGBN all", 8, 2, "cgbn", 0, True),
    Run("large, no warmup", 8, 2, "cgbn", 0, False),
)
NOISY = (  # one image per rank: per-rank BN statistics over a single image
    Run("noisy BN, local BN", 8, 1, "bn", 0, True),
    Run("noisy BN, CGBN all", 8, 1, "cgbn", 0, True),
)
# In the order they run: the first seeds (the noisy-BN pair first among the new ones), then seed 1 of
# every large-batch row.
RUNS = (
    Run("baseline", 2, 2, "cgbn", 0, True),
    Run("baseline, seed 1", 2, 2, "cgbn", 0, True, seed=1),
    *LARGE,
    *NOISY,
    *(replace(r, name=f"{r.name}, seed 1", seed=1) for r in (*NOISY, *LARGE)),
)


def configuration(run: Run) -> str:
    """The run's name without its seed: the row its seeds are averaged in."""
    return re.sub(r", seed \d+$", "", run.name)


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
    source: str = ""  # "": this checkout's run folder; else the commit of the results it was kept from


def train_command(
    run: Run,
    images: int,
    folder: Path,
    data: Path,
    config: Path,
    base_lr: float,
    extra: Sequence[str] = (),
) -> tuple[list[str], dict[str, str]]:
    """The ``mpirun ... python -m megdet_hpc.train`` command of one run; ``extra`` overrides come last
    (later overrides win: the parity experiment sets its own warmup, steps and evaluation period)."""
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
        *extra,
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


def execute(
    run: Run,
    images: int,
    out: Path,
    data: Path,
    config: Path,
    base_lr: float,
    extra: Sequence[str] = (),
    tag: str = "megdet_table",
) -> dict[str, Any]:
    """Train (or resume) one run; returns its bookkeeping (status, exit code, accumulated wall time)."""
    folder = out / slug(run.name)
    folder.mkdir(parents=True, exist_ok=True)
    state_file = folder / "experiment.json"
    state = json.loads(state_file.read_text()) if state_file.is_file() else {}
    if state.get("status") in ("done", "diverged"):
        print(f"[{tag}] {run.name}: {state['status']} earlier, skipped", flush=True)
        return state
    command, env = train_command(run, images, folder, data, config, base_lr, extra)
    print(
        f"[{tag}] {run.name}: {run.ranks} x {run.images_per_gpu}, BN size {run.bn_size}, lr {run.lr(base_lr):g}"
        f"{'' if run.warmup else ', no warmup'} -> {folder}",
        flush=True,
    )
    start = time.perf_counter()
    with open(folder / "stdout.log", "a") as log:
        code = subprocess.run(command, env=env, stdout=log, stderr=subprocess.STDOUT).returncode
    state["wall_s"] = state.get("wall_s", 0.0) + time.perf_counter() - start
    state["exit_code"] = code
    state["status"] = "done" if code == EXIT_OK else "diverged" if code == EXIT_NONFINITE else "failed"
    state_file.write_text(json.dumps(state))
    print(
        f"[{tag}] {run.name}: {state['status']} (exit {code}) after {state['wall_s']:.0f} s",
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


def _bn_label(r: Run) -> str:
    return "per-rank BN" if r.bn == "bn" else ("CGBN" if not r.bn_group else f"CGBN, group {r.bn_group}")


def _mean_std(values: list[float]) -> tuple[float | None, float | None]:
    if not values:
        return None, None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


def _pm(values: list[float]) -> str:
    mean, std = _mean_std(values)
    if mean is None:
        return "-"
    return f"{mean:.3f} +- {'n/a' if std is None else f'{std:.3f}'}"


def groups(outcomes: list[Outcome]) -> dict[str, list[Outcome]]:
    """Outcomes by configuration (the run name without its seed), in table order."""
    out: dict[str, list[Outcome]] = {}
    for o in outcomes:
        out.setdefault(configuration(Run(**o.run)), []).append(o)
    return out


def summary_rows(outcomes: list[Outcome]) -> list[dict[str, Any]]:
    rows = []
    for name, members in groups(outcomes).items():
        done = [o for o in members if o.status == "done" and o.AP is not None]
        aps, ap50s = [o.AP for o in done], [o.AP50 for o in done]
        rows.append(
            {
                "configuration": name,
                "seeds": [Run(**o.run).seed for o in members],
                "done": [Run(**o.run).seed for o in done],
                "diverged": [Run(**o.run).seed for o in members if o.status == "diverged"],
                "pending": [Run(**o.run).seed for o in members if o.status not in ("done", "diverged")],
                "AP": dict(zip(("mean", "std"), _mean_std(aps))),
                "AP50": dict(zip(("mean", "std"), _mean_std(ap50s))),
            }
        )
    return rows


def markdown(outcomes: list[Outcome], images: int, base_lr: float) -> str:
    lines = [
        f"Every run: {images} training images seen (demo detector, ResNet-18 FPN, 128 px, embedded data); "
        f"LR = {base_lr:g} x total batch / {BASE_BATCH}; evaluation on the 100 validation images.",
        "",
        "Per configuration (mean +- sample standard deviation over the seeds that finished; n/a: one seed):",
        "",
        "| configuration | ranks x images | total batch | BN | BN size | LR | warmup | seeds done | AP | AP50 | not finished |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    by_name = groups(outcomes)
    for row in summary_rows(outcomes):
        r = Run(**by_name[row["configuration"]][0].run)
        missing = [f"seed {s} diverged" for s in row["diverged"]] + [
            f"seed {s} not run" for s in row["pending"]
        ]
        done = [o for o in by_name[row["configuration"]] if o.status == "done" and o.AP is not None]
        lines.append(
            f"| {row['configuration']} | {r.ranks} x {r.images_per_gpu} | {r.total_batch} | {_bn_label(r)} | "
            f"{r.bn_size} | {r.lr(base_lr):g} | {'yes' if r.warmup else 'no'} | "
            f"{', '.join(map(str, row['done'])) or '-'} | {_pm([o.AP for o in done])} | "
            f"{_pm([o.AP50 for o in done])} | {', '.join(missing) or '-'} |"
        )
    lines += [
        "",
        "Every run:",
        "",
        "| run | ranks x images | total batch | BN | BN size | LR | warmup | AP | AP50 | wall time (s) | images/s | ran at |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for o in outcomes:
        r = Run(**o.run)
        ap = fmt(o.AP) if o.status == "done" else o.status
        if o.diverged_at is not None:
            ap += f" at iteration {o.diverged_at} (LR {_lr_at(o, o.diverged_at, images, base_lr):.3g})"
        source = o.source[:12] if o.source else ("this checkout" if o.status != "pending" else "-")
        lines.append(
            f"| {r.name} | {r.ranks} x {r.images_per_gpu} | {r.total_batch} | {_bn_label(r)} | {r.bn_size} | "
            f"{r.lr(base_lr):g} | {'yes' if r.warmup else 'no'} | {ap} | "
            f"{fmt(o.AP50) if o.status == 'done' else '-'} | {o.wall_s:.0f} | {fmt(o.images_per_s, 1)} | {source} |"
        )
    return "\n".join(lines) + "\n"


def plots(outcomes: list[Outcome], folder: Path) -> list[Path]:
    from megdet_hpc.utils.plotting import pyplot, save

    plt = pyplot()

    paths = []
    fig, ax = plt.subplots(figsize=(10, 4))
    series = (  # (which runs, label, colour, marker)
        (lambda r: r.total_batch == 16 and r.warmup, "batch 16 (8 x 2), warmup", "C0", "o"),
        (
            lambda r: r.total_batch == 8 and r.images_per_gpu == 1,
            "batch 8 (8 x 1: noisy BN), warmup",
            "C1",
            "D",
        ),
        (lambda r: r.total_batch == 4, "batch 4 (baseline)", "C2", "s"),
    )
    for select, label, color, marker in series:
        by_size: dict[int, list[float]] = {}
        for o in outcomes:
            r = Run(**o.run)
            if select(r) and o.AP is not None:
                by_size.setdefault(r.bn_size, []).append(o.AP)
                ax.scatter([r.bn_size], [o.AP], color=color, marker=marker, s=12, alpha=0.45, zorder=2)
        if not by_size:
            continue
        sizes = sorted(by_size)
        stats = [_mean_std(by_size[k]) for k in sizes]
        seeds = max(len(v) for v in by_size.values())
        ax.errorbar(
            sizes,
            [m for m, _ in stats],
            yerr=[sd or 0.0 for _, sd in stats],
            color=color,
            marker=marker,
            capsize=3,
            label=f"{label} (mean +- std, up to {seeds} seed{'s' if seeds > 1 else ''})",
            zorder=3,
        )
    measured = [o.AP for o in outcomes if o.AP is not None]
    bottom = min(measured) - 0.05 if measured else 0.0
    marked = set()
    for o in outcomes:  # diverged runs at the bottom edge, marked in their series' colour
        r = Run(**o.run)
        if o.AP is None and o.status == "diverged":
            label = f"batch {r.total_batch}, {'warmup' if r.warmup else 'no warmup'}: diverged"
            color = next((c for select, _, c, _ in series if r.warmup and select(r)), "C3")
            ax.scatter(
                [r.bn_size],
                [bottom + 0.01],
                marker="x",
                color=color,
                s=60,
                label=None if label in marked else label,
                zorder=3,
            )
            marked.add(label)
    if measured:
        ax.set_ylim(bottom, max(measured) + 0.03)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("BN size (images per BN statistic)")
    ax.set_ylabel("COCO AP (val)")
    ax.set_title("AP vs BN size at equal images seen")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:  # beside the axes: inside, it hid the markers at the bottom
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    paths.append(save(fig, folder / "megdet_table_ap_vs_bn_size.png", bbox_inches="tight"))
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
        ax.legend(fontsize=6, ncol=2)
        paths.append(save(fig, folder / f"megdet_table_{key}.png"))
    return paths


def committed_outcomes(results: Path, images: int, base_lr: float) -> dict[str, Outcome]:
    """Finished runs recorded in ``results/megdet_table.json`` at the same images and base LR, by name."""
    path = results / "megdet_table.json"
    if not path.is_file():
        return {}
    doc = json.loads(path.read_text())
    if doc.get("images") != images or doc.get("base_lr") != base_lr:
        return {}
    commit = doc.get("env", {}).get("commit", "unknown")
    kept = {}
    for entry in doc.get("runs", []):
        if entry.get("status") not in ("done", "diverged"):
            continue
        entry = {**entry, "source": entry.get("source") or commit}
        kept[entry["run"]["name"]] = Outcome(**entry)
    return kept


def run_table(
    runs: tuple[Run, ...],
    images: int,
    out: Path,
    results: Path,
    data: Path,
    config: Path,
    base_lr: float,
    only: tuple[str, ...] = (),
    report_only: bool = False,
) -> int:
    """Train (or resume, or skip) the runs, then write the table, JSON and plots to ``results``
    (``report_only``: only write them, from the run folders and the recorded runs as they are)."""
    from megdet_hpc.utils.provenance import environment

    unknown = set(only) - {r.name for r in runs}
    if unknown:
        raise UserError(f"unknown run {sorted(unknown)[0]!r}; runs: {', '.join(r.name for r in runs)}")
    kept = committed_outcomes(results, images, base_lr)

    def recorded(run: Run) -> Outcome | None:
        o = kept.get(run.name)
        return o if o is not None and o.run == asdict(run) else None

    for run in () if report_only else runs:
        if only and run.name not in only:
            continue
        state_file = out / slug(run.name) / "experiment.json"
        if not only and not state_file.is_file() and recorded(run) is not None:
            print(f"[megdet_table] {run.name}: in {results / 'megdet_table.json'}, skipped", flush=True)
            continue
        execute(run, images, out, data, config, base_lr)
    outcomes = []
    for run in runs:
        folder = out / slug(run.name)
        state_file = folder / "experiment.json"
        state = json.loads(state_file.read_text()) if state_file.is_file() else {}
        outcome = read_outcome(run, folder, state)
        if outcome.status == "pending" and recorded(run) is not None:
            outcome = recorded(run)
        outcomes.append(outcome)
    results.mkdir(parents=True, exist_ok=True)
    table = markdown(outcomes, images, base_lr)
    (results / "megdet_table.md").write_text(table)
    summary = {
        "images": images,
        "base_lr": base_lr,
        "env": environment(),
        "configurations": summary_rows(outcomes),
        "runs": [asdict(o) for o in outcomes],
    }
    (results / "megdet_table.json").write_text(json.dumps(summary, indent=1))
    written = plots(outcomes, results)
    print(table)
    print("wrote", results / "megdet_table.md", *written, flush=True)
    return 0 if report_only or all(o.status in ("done", "diverged") for o in outcomes) else 1


def main(argv: list[str] | None = None) -> int:
    p = ArgumentParser(prog="megdet_hpc.experiments.megdet_table", description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=4800, help="training images per run")
    p.add_argument(
        "--base-lr", type=float, default=BASE_LR, help=f"LR at batch {BASE_BATCH}, scaled linearly"
    )
    p.add_argument("--out", type=Path, default=Path("output/experiments/megdet_table"), help="run folders")
    p.add_argument(
        "--results",
        type=Path,
        default=Path("experiments/results"),
        help="table and plots (default: experiments/results under the current directory)",
    )
    p.add_argument("--only", nargs="*", default=[], help="run names to (re)run; default: all not yet run")
    p.add_argument("--data", type=Path, default=Path("datasets/synthetic"))
    p.add_argument("--report-only", action="store_true", help="write the table and plots, train nothing")
    a = p.parse(argv)

    def _run() -> int:
        from megdet_hpc.config import bundled_configs
        from megdet_hpc.data.synthetic import generate

        if a.images < 16 * 10:
            raise UserError("--images must be >= 160 (10 steps of the largest batch)")
        data = a.data.resolve() if a.report_only else generate(a.data.resolve(), 400, 100, 128, 0)
        config = bundled_configs() / "demo_cpu.yaml"  # the package's copy: no checkout needed
        return run_table(
            RUNS, a.images, a.out.resolve(), a.results, data, config, a.base_lr, tuple(a.only), a.report_only
        )

    return run_cli(_run, "megdet_hpc.experiments.megdet_table")


if __name__ == "__main__":
    sys.exit(main())
