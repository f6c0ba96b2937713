"""``python -m megdet_hpc.engine.report``: the summary of a run whose last logged step was skipped."""

from __future__ import annotations

import json
from pathlib import Path

from megdet_hpc.engine.report import summarize


def test_summary_when_the_last_logged_step_was_skipped(tmp_path: Path) -> None:
    rows = [
        {"iteration": 1, "images_seen": 2, "lr": 0.1, "loss": 1.25, "images_per_s": 4.0, "s_per_iter": 0.5},
        {
            "iteration": 2,
            "images_seen": 4,
            "lr": 0.1,
            "skipped": True,
            "images_per_s": 4.0,
            "s_per_iter": 0.5,
        },
    ]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    text = summarize(tmp_path)
    assert "iterations: 2  images seen: 4" in text and "final loss: 1.250" in text
    (tmp_path / "metrics.jsonl").write_text(json.dumps(rows[1]) + "\n")
    assert "final loss: - (every logged step skipped)" in summarize(tmp_path)
