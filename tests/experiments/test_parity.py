"""Smoke test of ``python -m megdet_hpc.experiments.parity`` (``make parity``): both systems train a
couple of tiny epochs, the table, JSON and plot are written, and a rerun skips the finished runs."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import yaml
from conftest import TINY_OVERRIDES

from megdet_hpc.experiments import parity


def test_parity_smoke_writes_table_json_plot_and_resume_skips(tmp_path: Path, capsys) -> None:
    cfg = copy.deepcopy(TINY_OVERRIDES)
    cfg["solver"].update(base_batch=4, total_batch=4, base_lr=0.02)
    cfg["eval"]["max_images"] = 0
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(cfg))
    results, out = tmp_path / "results", tmp_path / "runs"
    argv = [
        "--config", str(config), "--epochs", "2", "--step-epoch", "1", "--seeds", "0",
        "--train-images", "12", "--val-images", "4", "--size", "64", "--threads", "1",
        "--data", str(tmp_path / "data"), "--out", str(out), "--results", str(results),
    ]  # fmt: skip
    assert parity.main(argv) == 0
    first = capsys.readouterr().out
    assert (
        "[parity] megdet_hpc, seed 0: 2 x 2" in first and "[parity] torchvision, seed 0: 1 process" in first
    )

    doc = json.loads((results / "parity.json").read_text())
    runs = {r["system"]: r for r in doc["runs"]}
    assert set(runs) == {"megdet_hpc", "torchvision"}
    for run in runs.values():
        assert run["status"] == "done" and run["AP"] is not None and run["ms_per_image"] > 0
        seen = [e["images_seen"] for e in run["evals"]]
        assert len(seen) == 2 and seen[1] == doc["plan"]["images"], seen
    assert runs["megdet_hpc"]["evals"][0]["images_seen"] == runs["torchvision"]["evals"][0]["images_seen"]
    assert doc["env"]["commit"] and doc["verdict"].startswith("no verdict")  # one seed: no spread
    table = (results / "parity.md").read_text()
    assert "| megdet_hpc (2 ranks x 2 images, CGBN) | 1 |" in table and "Verdict:" in table
    assert (results / "parity_ap_vs_images.png").read_bytes()[:4] == b"\x89PNG"

    reference = out / "torchvision_seed_0"
    log_before = (out / "megdet_hpc_seed_0" / "stdout.log").read_text()
    assert parity.main(argv) == 0  # finished runs are skipped
    again = capsys.readouterr().out
    assert "megdet_hpc, seed 0: done earlier, skipped" in again
    assert "torchvision, seed 0: done earlier, skipped" in again
    assert (out / "megdet_hpc_seed_0" / "stdout.log").read_text() == log_before

    # An unfinished reference run resumes from its per-epoch checkpoint (here: after the last epoch).
    (reference / "experiment.json").unlink()
    assert parity.main(argv) == 0
    assert "resumed from" in (reference / "stdout.log").read_text()
    assert json.loads((results / "parity.json").read_text())["runs"][1]["AP"] == runs["torchvision"]["AP"]

    # The ablation: megdet_hpc again with torchvision's samplers, set beside the committed curves.
    from megdet_hpc.experiments import parity_ablation

    plan_args = [  # the parity run's plan and data, as it was given
        "--config", str(config), "--epochs", "2", "--step-epoch", "1", "--seeds", "0",
        "--train-images", "12", "--val-images", "4", "--size", "64", "--data", str(tmp_path / "data"),
    ]  # fmt: skip
    ablation = [*plan_args, "--parity-results", str(results), "--out", str(tmp_path / "ablation")]
    assert parity_ablation.main(ablation) == 0
    assert "megdet_hpc, samplers swapped, seed 0: 2 x 2" in capsys.readouterr().out
    from megdet_hpc.checkpoint.io import safe_load

    swapped = tmp_path / "ablation" / "megdet_hpc_samplers_swapped_seed_0"
    assert safe_load(swapped / "model_0000006.pth")["config"]["model"]["deterministic_sampling"] is False
    doc = json.loads((results / "ablation_samplers.json").read_text())
    assert [r["images_seen"] for r in doc["rows"]] == seen and doc["runs"][0]["status"] == "done"
    row = doc["rows"][-1]
    assert row["megdet_hpc"]["mean"] == runs["megdet_hpc"]["evals"][-1]["AP"]
    assert row["torchvision"]["mean"] == runs["torchvision"]["evals"][-1]["AP"]
    assert row["within"] == "-"  # one seed: no spread
    assert (
        "| megdet_hpc | megdet_hpc with torchvision's samplers | torchvision |"
        in (results / "ablation_samplers.md").read_text()
    )
    assert (results / "ablation_samplers.png").read_bytes()[:4] == b"\x89PNG"
    swapped_ap = row["megdet_hpc with torchvision's samplers"]["mean"]  # seed by seed: one seed here
    paired = f"| {seen[-1]} | {swapped_ap - row['megdet_hpc']['mean']:+.3f} ("
    assert paired in (results / "ablation_samplers.md").read_text()
    # Another plan than the committed results': one line naming what differs, nothing written.
    (results / "ablation_samplers.md").unlink()
    assert parity_ablation.main([*ablation, "--epochs", "3"]) != 0
    assert "epochs 2 there, 3 here" in capsys.readouterr().err
    assert not (results / "ablation_samplers.md").exists()
    assert parity_ablation.main([*plan_args, "--parity-results", str(tmp_path / "none")]) != 0
    assert "no parity results at" in capsys.readouterr().err
    (tmp_path / "garbled").mkdir()
    (tmp_path / "garbled" / "parity.json").write_text("{not json")
    assert parity_ablation.main([*plan_args, "--parity-results", str(tmp_path / "garbled")]) != 0
    assert "is not a parity.json" in capsys.readouterr().err
    assert (tmp_path / "garbled" / "parity.json").read_text() == "{not json"  # left as it was
    # The whole batch in one process (the reference's layout), megdet_hpc's samplers kept.
    assert parity_ablation.main([*ablation, "--swap", "one-process"]) == 0
    one = safe_load(tmp_path / "ablation" / "megdet_hpc_one_process_swapped_seed_0" / "model_0000006.pth")
    assert (one["world_size"], one["images_per_gpu"]) == (1, 4)
    assert one["config"]["model"]["deterministic_sampling"] is True
    assert "one process with the whole batch" in (results / "ablation_one-process.md").read_text()


def test_reference_model_is_the_megdet_architecture_with_stock_samplers() -> None:
    """The two systems differ in the training machinery, not the network: same parameters and buffers
    (names and shapes) and, for the same seed, the same initial weights; torchvision's own samplers."""
    import torch
    from torchvision.models.detection._utils import BalancedPositiveNegativeSampler

    from megdet_hpc.checkpoint import rng
    from megdet_hpc.config import load_config
    from megdet_hpc.config.load import bundled_configs
    from megdet_hpc.modeling import build_model

    cfg = load_config(bundled_configs() / "demo_cpu.yaml", [])
    rng.seed_all(3)
    ours = build_model(cfg).state_dict()
    torch.manual_seed(3)
    reference = parity.build_reference_model(cfg)
    theirs = reference.state_dict()
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert type(reference.rpn.fg_bg_sampler) is BalancedPositiveNegativeSampler
    assert type(reference.roi_heads.fg_bg_sampler) is BalancedPositiveNegativeSampler
