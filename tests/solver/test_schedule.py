"""The LR policy: linear scaling, warmup, steps, all as a function of images seen."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from megdet_hpc.config import load_config
from megdet_hpc.solver import LRSchedule, build_optimizer, plot_schedule
from megdet_hpc.solver.schedule import main as schedule_main


def make(total: int = 16, **solver) -> LRSchedule:
    opts = [
        f"solver.total_batch={total}",
        "solver.base_lr=0.02",
        "solver.base_batch=16",
        "solver.warmup_iters=100",
        "solver.warmup_factor=0.1",
        "solver.steps=[1000,2000]",
        "solver.max_iter=3000",
    ] + [f"solver.{k}={v}" for k, v in solver.items()]
    return LRSchedule.from_config(load_config(None, opts))


def test_linear_scaling_rule() -> None:
    assert make(16).lr(10**9 // 2) == pytest.approx(0.02 * 0.01)
    assert make(256).lr(100 * 256) == pytest.approx(0.32)  # 0.02 x 256/16 after warmup
    assert make(16).lr(100 * 16) == pytest.approx(0.02)


def test_warmup_is_linear_in_images() -> None:
    s = make(16)
    assert s.lr(0) == pytest.approx(0.002)  # warmup_factor x peak
    assert s.lr(50 * 16) == pytest.approx(0.02 * (0.1 * 0.5 + 0.5))
    assert s.lr(100 * 16 - 1) < 0.02 <= s.lr(100 * 16)


def test_steps_decay_by_gamma() -> None:
    s = make(16)
    assert s.lr(1000 * 16 - 1) == pytest.approx(0.02)
    assert s.lr(1000 * 16) == pytest.approx(0.002)
    assert s.lr(2000 * 16) == pytest.approx(0.0002)


def test_resume_with_another_batch_continues_the_same_curve() -> None:
    """The schedule is written for 16 images/step; a job that now runs 32/step at the same images
    seen gets the same phase (warmup fraction, decay) and the linear-rule peak for 32."""
    s = make(16)
    images = 40 * 16
    assert s.lr(images, total_batch=32) == pytest.approx(2 * s.lr(images))


def test_plot_and_cli(tmp_path: Path) -> None:
    out = plot_schedule(make(16), tmp_path / "lr.png")
    assert out.stat().st_size > 1000 and out.read_bytes()[:4] == b"\x89PNG"
    repo = Path(__file__).resolve().parents[2]
    assert (
        schedule_main(
            ["--config", str(repo / "configs/megdet_r50_fpn_bs256.yaml"), "--out", str(tmp_path / "b.png")]
        )
        == 0
    )
    assert (tmp_path / "b.png").exists()
    assert schedule_main(["--config", str(tmp_path / "missing.yaml")]) == 2


def test_optimizer_groups_weight_decay() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Linear(4, 2))
    cfg = load_config(
        None, ["solver.weight_decay=0.1", "solver.weight_decay_norm=0.0", "solver.weight_decay_bias=0.0"]
    )
    opt = build_optimizer(cfg, model)
    by_name = {g["name"]: g for g in opt.param_groups}
    assert by_name["norm"]["weight_decay"] == 0.0 and len(by_name["norm"]["params"]) == 2
    assert by_name["bias"]["weight_decay"] == 0.0 and len(by_name["bias"]["params"]) == 2
    assert by_name["weight"]["weight_decay"] == 0.1 and len(by_name["weight"]["params"]) == 2
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(model.parameters()))
    assert isinstance(opt, torch.optim.SGD)
