"""``python -m megdet_hpc.experiments.parity_ablation``: which part of megdet_hpc makes its AP curve differ
from torchvision's reference loop?

The parity experiment (``megdet_hpc.experiments.parity``) compares two whole systems.  When their curves
part -- ``make parity-long`` measured megdet_hpc *ahead* during the constant-LR phase, every seed, and
level after the LR step -- the question is which of megdet_hpc's differences does it.  This trains
megdet_hpc again on the same plan and seeds with **one part swapped for torchvision's** and sets the
resulting curve between the two committed ones, read from the parity results' ``parity.json`` (never
retrained: both systems are deterministic on the CPU, so their curves stand):

* ``samplers`` -- ``model.deterministic_sampling=false``: torchvision's ``BalancedPositiveNegativeSampler``
  drawing from each rank's global RNG, instead of megdet_hpc's keyed per-(seed, step, image) draw;
* ``one-process`` -- the whole batch in one process, as the reference trains on a CPU: BN statistics
  in one process instead of CGBN across 2 ranks, no gradient averaging (megdet_hpc's samplers, data
  order and loader stay).

If the swapped run falls to the reference's curve, the part explains the gap; if it stays on
megdet_hpc's, it does not.  Results: ``ablation_<swap>.md`` (AP per evaluation point, mean +- seed
standard deviation, and which curve the swapped run is within the seed spread of),
``ablation_<swap>.json`` and ``ablation_<swap>.png`` beside ``parity.json``.  Resumable like the parity
runs; a finished run is skipped.
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from megdet_hpc.experiments import parity
from megdet_hpc.utils.cli import ArgumentParser, run_cli
from megdet_hpc.utils.errors import UserError


@dataclass(frozen=True)
class Swap:
    """A part of megdet_hpc replaced by torchvision's way: config overrides and the process layout."""

    label: str
    overrides: tuple[str, ...] = ()
    ranks: int = 2

    def describe(self) -> str:
        layout = {1: "one process with the whole batch", 2: ""}.get(self.ranks, f"{self.ranks} processes")
        return "; ".join(part for part in (" ".join(f"`{o}`" for o in self.overrides), layout) if part)


SWAPS = {
    "samplers": Swap("megdet_hpc with torchvision's samplers", ("model.deterministic_sampling=false",)),
    # One process with the whole batch, as the reference trains on a CPU: BN statistics in one process
    # instead of CGBN across 2 ranks, and no gradient averaging.  Its 2 threads stand for the 2 ranks.
    "one-process": Swap("megdet_hpc in one process x 4 images", ("train.threads=2",), ranks=1),
}


def committed(results: Path, plan: parity.Plan) -> dict[str, Any]:
    """The parity results to compare with; their plan must be this one (same data, schedule, batch)."""
    path = results / "parity.json"
    if not path.is_file():
        raise UserError(f"no parity results at {path}: run megdet_hpc.experiments.parity first")
    try:
        doc = json.loads(path.read_text())
        theirs = {k: doc["plan"][k] for k in ("train_images", "batch", "lr", "epochs", "step_epoch", "size")}
    except (ValueError, KeyError, TypeError) as exc:
        raise UserError(f"{path} is not a parity.json (no plan: {exc})") from exc
    ours = {k: getattr(plan, k) for k in theirs}
    if theirs != ours:
        differ = ", ".join(f"{k} {theirs[k]} there, {ours[k]} here" for k in theirs if theirs[k] != ours[k])
        raise UserError(f"{path} was trained on another plan ({differ}): pass the same sizes and schedule")
    return doc


def within(stats: dict[str, tuple[float | None, float | None]], name: str) -> str:
    """The other curves ``name``'s mean lies within the seed spread of (parity.compare: the larger of
    the two standard deviations), or "neither"."""
    mean, std = stats[name]
    if mean is None or std is None:
        return "-"
    near = [
        other
        for other, (m, s) in stats.items()
        if other != name
        and m is not None
        and s is not None
        and parity.compare(mean, std, m, s)[0] == "parity"
    ]
    return ", ".join(near) or "neither"


def paired(label: str, doc: dict[str, Any], ablated: list[parity.Outcome]) -> list[str]:
    """Markdown: the swapped run minus each committed system, seed by seed (a seed fixes the initial
    weights: a paired difference cancels them), as mean difference and the count of seeds above."""
    by_seed: dict[str, dict[int, dict[int, float]]] = {"megdet_hpc": {}, "torchvision": {}, label: {}}
    for r in doc["runs"]:
        if r["system"] in by_seed:
            by_seed[r["system"]][r["seed"]] = {e["images_seen"]: e["AP"] for e in r["evals"]}
    for o in ablated:
        by_seed[label][o.seed] = {e["images_seen"]: e["AP"] for e in o.evals}
    lines = [
        "Seed by seed (same seed: same initial weights): the swapped run's AP minus each system's, mean over "
        "the seeds both reached, and in how many seeds the swapped run is ahead.",
        "",
        "| images seen | minus megdet_hpc | minus torchvision |",
        "|---|---|---|",
    ]
    points = sorted({n for evals in by_seed[label].values() for n in evals})
    for n in points:
        cells = []
        for other in ("megdet_hpc", "torchvision"):
            diffs = [
                evals[n] - by_seed[other][seed][n]
                for seed, evals in by_seed[label].items()
                if n in evals and n in by_seed[other].get(seed, {})
            ]
            ahead = sum(d > 0 for d in diffs)
            cells.append(f"{sum(diffs) / len(diffs):+.3f} ({ahead} of {len(diffs)} ahead)" if diffs else "-")
        lines.append(f"| {n} | {' | '.join(cells)} |")
    return lines


def report(swap: str, doc: dict[str, Any], ablated: list[parity.Outcome], results: Path) -> str:
    """Write ``ablation_<swap>.{md,json,png}``; returns the markdown."""
    from megdet_hpc.utils.provenance import environment

    label = SWAPS[swap].label
    curves = {
        "megdet_hpc": parity.ap_by_point([r["evals"] for r in doc["runs"] if r["system"] == "megdet_hpc"]),
        label: parity.ap_by_point([o.evals for o in ablated]),
        "torchvision": parity.ap_by_point([r["evals"] for r in doc["runs"] if r["system"] == "torchvision"]),
    }
    header = " | ".join(curves)
    lines = [
        f"megdet_hpc with one part swapped for torchvision's ({swap}: {SWAPS[swap].describe()}), on the plan "
        f"and seeds of `parity.json` beside this file; the other two columns are read from there. COCO AP, "
        "mean +- sample standard deviation over seeds (n = seeds evaluated there).",
        "",
        f"| images seen | {header} | swapped run within the spread of |",
        "|---" * (len(curves) + 2) + "|",
    ]
    rows = []
    for n in sorted(set().union(*curves.values())):
        stats = {name: parity.spread(points.get(n, [])) for name, points in curves.items()}
        cells = [
            "-"
            if mean is None
            else f"{mean:.3f} +- {'n/a' if std is None else f'{std:.3f}'} (n={len(curves[k].get(n, []))})"
            for k, (mean, std) in stats.items()
        ]
        near = within(stats, label)
        lines.append(f"| {n} | {' | '.join(cells)} | {near} |")
        rows.append(
            {"images_seen": n, **{k: {"mean": m, "std": s} for k, (m, s) in stats.items()}, "within": near}
        )
    lines += ["", *paired(label, doc, ablated)]
    text = "\n".join(lines) + "\n"
    results.mkdir(parents=True, exist_ok=True)
    (results / f"ablation_{swap}.md").write_text(text)
    (results / f"ablation_{swap}.json").write_text(
        json.dumps(
            {
                "swap": swap,
                "overrides": list(SWAPS[swap].overrides),
                "ranks": SWAPS[swap].ranks,
                "plan": doc["plan"],
                "rows": rows,
                "env": environment(),
                "runs": [asdict(o) for o in ablated],
            },
            indent=1,
        )
    )
    plot(curves, results / f"ablation_{swap}.png")
    return text


def plot(curves: dict[str, dict[int, list[float]]], path: Path) -> Path:
    from megdet_hpc.utils.plotting import pyplot, save

    plt = pyplot()

    fig, ax = plt.subplots(figsize=(7, 4))
    for color, (name, points) in zip(("C0", "C2", "C1"), curves.items()):
        seeds = max((len(v) for v in points.values()), default=0)
        parity.draw_ap(ax, points, color, f"{name} ({seeds} seeds)")
    parity.label_ap_axes(ax, "AP vs images seen (mean +- std over seeds)")
    return save(fig, path)


def main(argv: list[str] | None = None) -> int:
    p = ArgumentParser(prog="megdet_hpc.experiments.parity_ablation", description=__doc__.splitlines()[0])
    p.add_argument("--swap", choices=sorted(SWAPS), default="samplers", help="the part to swap")
    p.add_argument("--parity-results", type=Path, required=True, help="folder holding the parity.json")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--step-epoch", type=int, default=2)
    p.add_argument("--seeds", type=int, nargs="+", default=list(parity.SEEDS))
    p.add_argument("--out", type=Path, default=Path("output/experiments/parity_ablation"), help="run folders")
    p.add_argument("--data", type=Path, default=Path("datasets/synthetic_parity"))
    p.add_argument("--config", type=Path, help="detector config (default: the bundled demo_cpu.yaml)")
    p.add_argument("--train-images", type=int, default=202)
    p.add_argument("--val-images", type=int, default=100)
    p.add_argument("--size", type=int, default=128)
    p.add_argument("opts", nargs="*", help="config overrides (the parity run's own), section.key=value")
    a = p.parse(argv)

    def _run() -> int:
        from megdet_hpc.experiments.megdet_table import slug

        config = parity.resolve_config(a.config)
        plan, data = parity.prepare(
            config, a.opts, a.epochs, a.step_epoch, a.data, a.train_images, a.val_images, a.size
        )
        doc = committed(a.parity_results, plan)
        system = f"megdet_hpc, {a.swap} swapped"
        swap = SWAPS[a.swap]
        opts = [*parity.data_opts(data, tuple(a.opts)), *swap.overrides]
        ablated = []
        for seed in a.seeds:
            state = parity.execute_megdet(
                seed, plan, a.out.resolve(), data, config, opts, system=system, ranks=swap.ranks
            )
            folder = a.out.resolve() / slug(parity.run_name(system, seed))
            outcome = parity.read_outcome("megdet_hpc", seed, folder, plan)
            outcome.system = system
            ablated.append(outcome)
            if state.get("status") == "failed":
                raise UserError(f"{parity.run_name(system, seed)} failed: see {folder / 'stdout.log'}")
        print(report(a.swap, doc, ablated, a.parity_results), flush=True)
        print("wrote", a.parity_results / f"ablation_{a.swap}.md", flush=True)
        return 0

    return run_cli(_run, "megdet_hpc.experiments.parity_ablation")


if __name__ == "__main__":
    sys.exit(main())
