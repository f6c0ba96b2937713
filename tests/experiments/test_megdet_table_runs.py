"""Smoke test of the MegDet table's machinery (``make experiment``) on the noisy-BN shape at toy size:
one image per rank, local BN vs CGBN over the ranks; seeds averaged into one row with their spread;
runs recorded in the results JSON kept and not rerun; a rerun skips finished runs."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from megdet_hpc.experiments import megdet_table as table


def test_noisy_bn_rows_seeds_spread_and_resume(tiny_config, tiny_data: Path, tmp_path: Path, capsys) -> None:
    runs = (
        table.Run("noisy BN, local BN", 2, 1, "bn", 0, True),
        table.Run("noisy BN, CGBN all", 2, 1, "cgbn", 0, True),
        table.Run("noisy BN, CGBN all, seed 1", 2, 1, "cgbn", 0, True, seed=1),
    )
    results, out = tmp_path / "results", tmp_path / "runs"
    results.mkdir()
    recorded = table.Outcome(asdict(runs[2]), "done", 0, 12.0, AP=0.25, AP50=0.5, images_per_s=3.0)
    earlier = {"images": 16, "base_lr": 0.01, "env": {"commit": "abc123"}, "runs": [asdict(recorded)]}
    (results / "megdet_table.json").write_text(json.dumps(earlier))
    args = (runs, 16, out, results, tiny_data, tiny_config(), 0.01)

    assert table.run_table(*args) == 0
    first = capsys.readouterr().out
    assert "noisy BN, local BN: 2 x 1, BN size 1, lr 0.005" in first
    assert "noisy BN, CGBN all: 2 x 1, BN size 2, lr 0.005" in first
    assert "noisy BN, CGBN all, seed 1: in" in first and "skipped" in first  # kept, not rerun
    assert not (out / table.slug(runs[2].name)).exists()

    doc = json.loads((results / "megdet_table.json").read_text())
    rows = {r["configuration"]: r for r in doc["configurations"]}
    assert (
        rows["noisy BN, CGBN all"]["done"] == [0, 1] and rows["noisy BN, CGBN all"]["AP"]["std"] is not None
    )
    assert rows["noisy BN, local BN"]["done"] == [0] and rows["noisy BN, local BN"]["AP"]["std"] is None
    assert doc["runs"][2]["source"] == "abc123" and doc["runs"][0]["source"] == ""
    md = (results / "megdet_table.md").read_text()
    assert "| noisy BN, CGBN all | 2 x 1 | 2 | CGBN | 2 |" in md and " +- " in md
    for name in ("ap_vs_bn_size", "loss", "lr"):
        assert (results / f"megdet_table_{name}.png").read_bytes()[:4] == b"\x89PNG"

    log_before = (out / table.slug(runs[0].name) / "stdout.log").read_text()
    assert table.run_table(*args) == 0
    again = capsys.readouterr().out
    assert again.count("done earlier, skipped") == 2 and "seed 1: in" in again
    assert (out / table.slug(runs[0].name) / "stdout.log").read_text() == log_before
    assert json.loads((results / "megdet_table.json").read_text())["runs"][2]["source"] == "abc123"
