"""``python -m megdet_hpc.engine.report OUTPUT_DIR``: a short summary of a finished run."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from megdet_hpc.utils.cli import ArgumentParser, run_cli
from megdet_hpc.utils.errors import UserError


def summarize(output_dir: Path) -> str:
    metrics_file = output_dir / "metrics.jsonl"
    if not metrics_file.is_file():
        raise UserError(f"no metrics.jsonl in {output_dir}")
    records = [json.loads(line) for line in metrics_file.read_text().splitlines() if line.strip()]
    train = [r for r in records if "images_per_s" in r]
    losses = [r for r in train if "loss" in r]  # a skipped (non-finite) step has none
    evals = [r for r in records if "AP50" in r]
    steady = train[len(train) // 5 :] or train
    ips = sum(r["images_per_s"] for r in steady) / max(len(steady), 1)
    lines = [f"run: {output_dir}"]
    if train:
        lines.append(
            f"iterations: {train[-1]['iteration']}  images seen: {train[-1]['images_seen']}  "
            f"throughput: {ips:.2f} images/s  final loss: "
            + (f"{losses[-1]['loss']:.3f}" if losses else "- (every logged step skipped)")
        )
    if evals:
        e = evals[-1]
        lines.append(f"COCO bbox (val): AP {e['AP']:.3f}  AP50 {e['AP50']:.3f}  AP75 {e['AP75']:.3f}")
    if (output_dir / "training_curves.png").exists():
        lines.append(f"curves: {output_dir / 'training_curves.png'}")
    lines.append(
        f"checkpoints: {output_dir} (last_checkpoint -> "
        f"{(output_dir / 'last_checkpoint').read_text().strip() if (output_dir / 'last_checkpoint').exists() else '-'})"
    )
    lines.append(f"detections: {output_dir / 'eval' / 'bbox_results.json'}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = ArgumentParser(prog="megdet_hpc.engine.report", description="Summarise a finished run")
    p.add_argument("output_dir", type=Path)
    a = p.parse(argv)

    def _run() -> int:
        print(summarize(a.output_dir))
        return 0

    return run_cli(_run, "megdet_hpc.engine.report")


if __name__ == "__main__":
    sys.exit(main())
