"""The time-to-train cost model and the planner CLI (presets, and calibration on real processes)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from megdet_hpc.launch.local import local_env
from megdet_hpc.perf.cost_model import PRESETS, Link, Machine, Workload, predict
from megdet_hpc.plan import main as plan_main

REPO = Path(__file__).resolve().parents[2]


def test_ring_allreduce_formula() -> None:
    link = Link(alpha_s=1e-5, bandwidth_Bps=1e9)
    assert link.ring_allreduce_s(1, 1e6) == 0.0
    assert link.ring_allreduce_s(4, 1e6) == pytest.approx(2 * 3 * 1e-5 + 2 * 3 / 4 * 1e6 / 1e9)


def test_hierarchical_beyond_a_node() -> None:
    m = Machine("m", 0.1, gpus_per_node=8, intra=Link(1e-6, 100e9), inter=Link(1e-5, 10e9))
    assert m.allreduce_s(8, 1e8) == pytest.approx(m.intra.ring_allreduce_s(8, 1e8))
    assert m.allreduce_s(16, 1e8) == pytest.approx(
        m.intra.ring_allreduce_s(8, 1e8) + m.inter.ring_allreduce_s(2, 1e8 / 8)
    )


def test_predictions_scale_sensibly() -> None:
    w = Workload(images_per_gpu=2, params=40_000_000, bn_channels=(64, 256) * 20, total_images=1_440_000)
    preds = [predict(PRESETS["megdet2018"], w, g) for g in (1, 8, 16, 128)]
    assert preds[0].efficiency == pytest.approx(1.0) and preds[0].cgbn_s == 0.0
    assert all(a.efficiency >= b.efficiency for a, b in zip(preds, preds[1:]))
    assert all(a.time_to_train_h > b.time_to_train_h for a, b in zip(preds, preds[1:]))
    local = predict(
        PRESETS["megdet2018"], Workload(2, 40_000_000, (64,) * 40, 1_440_000, bn_group_size=1), 128
    )
    assert local.cgbn_s == 0.0 and local.iter_s < preds[-1].iter_s


def test_megdet_shape_with_2018_parameters(tmp_path: Path) -> None:
    """16 -> 256 images on 8 -> 128 GPUs: time-to-train falls from ~33 h to a few hours."""
    assert (
        plan_main(
            [
                "--config",
                str(REPO / "configs/megdet_r50_fpn_bs16.yaml"),
                "--preset",
                "megdet2018",
                "--gpus",
                "8",
                "--out",
                str(tmp_path / "a"),
            ]
        )
        == 0
    )
    assert (
        plan_main(
            [
                "--config",
                str(REPO / "configs/megdet_r50_fpn_bs256.yaml"),
                "--preset",
                "megdet2018",
                "--gpus",
                "128",
                "--out",
                str(tmp_path / "b"),
            ]
        )
        == 0
    )
    h8 = json.loads((tmp_path / "a/plan.json").read_text())["predictions"][0]["time_to_train_h"]
    h128 = json.loads((tmp_path / "b/plan.json").read_text())["predictions"][0]["time_to_train_h"]
    assert 28 < h8 < 40 and 1.5 < h128 < 6
    assert (tmp_path / "b/plan.png").read_bytes()[:4] == b"\x89PNG"


def test_plan_bad_input(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert plan_main(["--config", str(tmp_path / "none.yaml")]) == 2
    assert "config file not found" in capsys.readouterr().err
    assert plan_main(["--config", str(REPO / "configs/demo_cpu.yaml"), "--gpus", "0"]) == 2
    assert (
        plan_main(["--config", str(REPO / "configs/demo_cpu.yaml"), "--calibrate", "--calibrate-steps", "0"])
        == 2
    )
    assert "--calibrate-steps must be >= 1" in capsys.readouterr().err


def test_calibration_runs_real_processes(tiny_config, tmp_path: Path) -> None:
    """--calibrate measures collectives and steps under mpirun and validates against a real 2-rank step
    (the accuracy target is a benchmark matter: bench/results/plan_demo*)."""
    cfg = tiny_config(data={"images_per_gpu": 1}, train={"checkpoint_period": 0, "eval_at_end": False})
    scratch = tmp_path / "tmp"  # the processes' TMPDIR: what they leave there is visible
    scratch.mkdir()
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "megdet_hpc.plan",
            "--config",
            str(cfg),
            "--calibrate",
            "--calibrate-steps",
            "2",
            "--launcher",
            "mpirun",
            "--gpus",
            "1",
            "2",
            "--out",
            str(tmp_path / "plan"),
        ],
        cwd=REPO,
        env=local_env("single", {"TMPDIR": str(scratch)}),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert sorted(p.name for p in scratch.glob("megdet-*")) == []  # the timing runs' output dirs are gone
    plan = json.loads((tmp_path / "plan/plan.json").read_text())
    coll = plan["collectives"]
    assert coll["backend"] == "mpi" and coll["size"] == 2 and coll["gradient_elements"] > 1e6
    assert plan["step_2"]["size"] == 2 and plan["step_1"]["size"] == 1
    v = plan["validation"]
    assert v["measured_2_s"] > 0 and v["predicted_2_s"] >= plan["step_1"]["s_per_iter"]
    assert "validation: 2 processes predicted" in proc.stdout


def test_planner_takes_the_measured_gpu_step_when_there_is_one(tmp_path: Path, capsys) -> None:
    """bench/gpu.sh's result replaces the H100 preset's typed-in compute time (and says so)."""
    cfg = str(REPO / "configs/megdet_r50_fpn_bs16.yaml")
    gpu = tmp_path / "gpu.json"
    gpu.write_text(
        json.dumps(
            {
                "env": {"device": "NVIDIA H100 80GB HBM3"},
                "step": [{"contender": "SimpleTrainer.run_step", "images": 2, "s_per_iter": 0.07}],
            }
        )
    )
    assert (
        plan_main(["--config", cfg, "--gpus", "8", "--measurements", str(gpu), "--out", str(tmp_path / "m")])
        == 0
    )
    measured = json.loads((tmp_path / "m/plan.json").read_text())
    assert measured["compute_source"] == str(gpu) and "compute measured: NVIDIA H100" in measured["machine"]
    assert measured["predictions"][0]["compute_s"] == pytest.approx(0.07)
    # No --measurements: the preset's constant, whatever files a checkout holds (none is looked for).
    assert plan_main(["--config", cfg, "--gpus", "8", "--out", str(tmp_path / "p")]) == 0
    assert json.loads((tmp_path / "p/plan.json").read_text())["compute_source"] == "preset constant"
    capsys.readouterr()
    missing = tmp_path / "none.json"
    assert plan_main(["--config", cfg, "--measurements", str(missing), "--out", str(tmp_path / "n")]) == 2
    assert f"--measurements {missing} does not exist" in capsys.readouterr().err
    gpu.write_text("{}")
    assert plan_main(["--config", cfg, "--gpu-json", str(gpu), "--out", str(tmp_path / "x")]) == 2  # old name
    assert "not a bench/gpu.sh result" in capsys.readouterr().err
