"""Config loading: inheritance, overrides, and one-line errors for bad input."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest

from megdet_hpc.config import ConfigError, load_config, parse_overrides
from megdet_hpc.engine.batch import plan_batch

REPO = Path(__file__).resolve().parents[2]


def test_shipped_configs_load_and_are_consistent() -> None:
    bs16 = load_config(REPO / "configs/megdet_r50_fpn_bs16.yaml")
    bs256 = load_config(REPO / "configs/megdet_r50_fpn_bs256.yaml")
    assert (bs16.solver.total_batch, bs256.solver.total_batch) == (16, 256)
    assert bs16.model.backbone == "resnet50" and bs16.model.norm == "cgbn"
    # Same schedule in images: 90k x 16 == 5625 x 256.
    assert bs16.solver.max_iter * 16 == bs256.solver.max_iter * 256
    plan_batch(8, 2, 1, 16, None)
    plan_batch(128, 2, 1, 256, None)
    demo = load_config(REPO / "configs/demo_cpu.yaml")
    plan_batch(2, demo.data.images_per_gpu, demo.solver.grad_accum, demo.solver.total_batch, None)


def test_every_shipped_config_loads() -> None:
    names = sorted(p.name for p in (REPO / "configs").glob("*.yaml"))
    assert "custom_dataset_template.yaml" in names
    for name in names:
        load_config(REPO / "configs" / name)


def test_overrides_are_typed() -> None:
    assert set(parse_overrides(["solver.steps=[1,2]", "model.backbone=resnet18"])) == {"solver", "model"}
    cfg = load_config(None, ["solver.base_lr=1", "model.cgbn_where=[backbone,fpn]", "solver.steps=[1,2]"])
    assert (
        cfg.solver.base_lr == 1.0
        and cfg.model.cgbn_where == ("backbone", "fpn")
        and cfg.solver.steps == (1, 2)
    )


def test_string_overrides_are_literal() -> None:
    """YAML would read ` #2` as a comment and train in another run's directory."""
    cfg = load_config(None, ["train.output_dir=/runs/exp #2", "data.train_images=null", "model.weights="])
    assert cfg.train.output_dir == "/runs/exp #2"
    assert cfg.data.train_images == "null" and cfg.model.weights == ""


def test_yaml_scalars_follow_yaml_1_2(tmp_path: Path) -> None:
    (tmp_path / "c.yaml").write_text("solver:\n  weight_decay: 1e-4\n  base_lr: 2E-2\ntrain:\n  seed: 0123\n")
    cfg = load_config(tmp_path / "c.yaml", ["solver.momentum=9e-1", "train.log_period=010"])
    assert (cfg.solver.weight_decay, cfg.solver.base_lr, cfg.train.seed) == (1e-4, 0.02, 123)
    assert (cfg.solver.momentum, cfg.train.log_period) == (0.9, 10)
    with pytest.raises(ConfigError, match="train.tensorboard: expected true/false, got 'yes'"):
        load_config(None, ["train.tensorboard=yes"])


def test_the_config_is_frozen_and_updated_by_copy() -> None:
    from megdet_hpc.config import updated

    cfg = load_config(None)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.solver.max_iter = 3  # type: ignore[misc]
    new = updated(cfg, {"solver": {"max_iter": 3}})
    assert (new.solver.max_iter, cfg.solver.max_iter) == (3, 90000)
    with pytest.raises(ConfigError, match="solver.max_iter must be > 0"):
        updated(cfg, {"solver": {"max_iter": 0}})


def test_the_config_is_immutable_inside_and_its_dict_holds_lists() -> None:
    """Lists are tuples in the config (a frozen dataclass does not freeze a list it holds); YAML,
    overrides, ``updated`` and ``to_dict`` (so checkpoints) keep plain lists."""
    from megdet_hpc.config import from_dict, to_dict, updated

    cfg = load_config(None, ["model.cgbn_where=[backbone,fpn]", "train.requeue_signals=[SIGTERM]"])
    hash(cfg)  # nothing mutable anywhere inside
    with pytest.raises(AttributeError):
        cfg.train.requeue_signals.append("SIGINT")  # type: ignore[attr-defined]
    with pytest.raises(TypeError):
        cfg.model.anchor_sizes[0] = 8  # type: ignore[index]
    assert cfg.model.cgbn_where == ("backbone", "fpn") and cfg.train.requeue_signals == ("SIGTERM",)
    data = to_dict(cfg)
    assert data["model"]["cgbn_where"] == ["backbone", "fpn"]
    assert data["model"]["anchor_sizes"] == [32, 64, 128, 256, 512]
    assert data["solver"]["steps"] == [60000, 80000] and data["train"]["requeue_signals"] == ["SIGTERM"]
    assert from_dict(data) == cfg
    new = updated(cfg, {"model": {"aspect_ratios": [1.0, 2.0]}})
    assert new.model.aspect_ratios == (1.0, 2.0) and to_dict(new)["model"]["aspect_ratios"] == [1.0, 2.0]


def test_each_key_is_declared_once_in_the_schema() -> None:
    """validate and the architecture keys are read from the schema's field declarations."""
    from megdet_hpc.config import ARCHITECTURE_KEYS
    from megdet_hpc.config.rules import rules_of
    from megdet_hpc.config.schema import SolverConfig

    fields = {f.name: f for f in dataclasses.fields(SolverConfig)}
    assert rules_of(fields["amp"])[0].allowed == ("off", "fp16", "bf16")
    assert set(ARCHITECTURE_KEYS) == {
        "backbone",
        "num_classes",
        "norm",
        "cgbn_where",
        "box_head_convs",
        "box_head_dim",
        "anchor_sizes",
        "aspect_ratios",
    }


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["model.colour=red"], "unknown config key model.colour"),
        (["modle.backbone=resnet18"], "unknown config key modle"),
        (["solver.base_lr=fast"], "solver.base_lr: expected a number"),
        (["solver.max_iter=1.5"], "solver.max_iter: expected an integer"),
        (["model.backbone=vgg16"], "model.backbone='vgg16' is not one of"),
        (["solver.steps=[10,5]"], "solver.steps must be increasing"),
        (["model.cgbn_where=[head]"], "model.cgbn_where: 'head'"),
        (["model.cgbn_where=[box_head]"], "box_head_convs is 0"),
        (["solver.warmup_factor=0"], "solver.warmup_factor"),
        (["data.images_per_gpu=0"], "data.images_per_gpu must be > 0"),
        (["solver.grad_sync=sometimes"], "solver.grad_sync='sometimes' is not one of"),
        (["solver.grad_sync=after_backward", "solver.fp16_compression=true"], "fp16_compression needs"),
        (["solver.base_lr"], "not of the form"),
        (["train.log_period=0"], "train.log_period must be > 0"),
        (["train.eval_period=-1"], "train.eval_period must be >= 0"),
        (["train.stall_timeout_s=-1"], "train.stall_timeout_s must be >= 0"),
        (["train.stall_timeout_s=soon"], "train.stall_timeout_s: expected a number"),
        (["data.num_workers=-1"], "data.num_workers must be >= 0"),
        (["solver.momentum=-5"], "solver.momentum must be in"),
        (["model.trainable_layers=9"], "model.trainable_layers must be in 0..5"),
        (["model.anchor_sizes=[32]"], "model.anchor_sizes needs 5 positive sizes"),
        (["model.min_size=256", "model.max_size=64"], "model.min_size=256 is larger than model.max_size=64"),
        (["train.requeue_signals=[SIGFOO]"], "train.requeue_signals: unknown signal 'SIGFOO'"),
        (["solver.max_nonfinite=0"], "solver.max_nonfinite must be > 0"),
        (["solver.amp=true"], "solver.amp='true' is not one of off, fp16, bf16"),
        (["model.activation_checkpointing=[head]"], "model.activation_checkpointing: 'head'"),
        (["solver.base_lr=nan"], "solver.base_lr: expected a finite number"),
        (["train.output_dir="], "train.output_dir must not be empty"),
    ],
)
def test_bad_values_raise_one_line_errors(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message) as info:
        load_config(None, overrides)
    assert "\n" not in str(info.value)


def test_batch_arithmetic_is_checked_on_a_fresh_start() -> None:
    """One rule (``BatchPlan.check``) for plan_batch and validate, one message."""
    from megdet_hpc.config import BatchPlan, validate

    message = r"solver.total_batch=16 != world size 4 x data.images_per_gpu 2 x solver.grad_accum 1 = 8"
    with pytest.raises(ConfigError, match=message):
        plan_batch(4, 2, 1, 16, None)
    with pytest.raises(ConfigError, match=message):
        validate(load_config(None), 4)
    validate(load_config(None), 8)
    assert BatchPlan(4, 2, 2).check(16).per_pass == 8


def test_resume_on_another_world_size_keeps_the_total_batch() -> None:
    assert plan_batch(1, 2, 1, 2, resuming_from=4).grad_accum == 2  # 2 -> 1 rank: accumulate
    assert plan_batch(4, 2, 1, 8, resuming_from=4).images_per_gpu == 1  # 2 -> 4 ranks: fewer per GPU
    odd = plan_batch(3, 2, 1, 6, resuming_from=4)  # cannot keep 4 with 3 ranks
    assert odd.total == 6


def test_inheritance_and_file_errors(tmp_path: Path) -> None:
    (tmp_path / "base.yaml").write_text("solver:\n  base_lr: 0.5\n  max_iter: 7\n")
    (tmp_path / "child.yaml").write_text("_base_: base.yaml\nsolver:\n  max_iter: 9\n")
    cfg = load_config(tmp_path / "child.yaml")
    assert (cfg.solver.base_lr, cfg.solver.max_iter) == (0.5, 9)
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    (tmp_path / "bad.yaml").write_text("solver: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(tmp_path / "bad.yaml")
    (tmp_path / "loop.yaml").write_text("_base_: loop.yaml\n")
    with pytest.raises(ConfigError, match="inheritance loop"):
        load_config(tmp_path / "loop.yaml")
    (tmp_path / "listbase.yaml").write_text("_base_: [base.yaml]\n")
    with pytest.raises(ConfigError, match="_base_ must be a file name"):
        load_config(tmp_path / "listbase.yaml")
    with pytest.raises(ConfigError, match="is a directory"):
        load_config(tmp_path)


def test_bundled_configs_and_the_default_by_total_batch(tmp_path: Path, monkeypatch) -> None:
    """A wheel has no checkout: configs ship in the package and resolve by name from anywhere."""
    from megdet_hpc.config import bundled_configs, default_config_for

    monkeypatch.chdir(tmp_path)
    assert load_config("configs/megdet_r50_fpn_bs256.yaml").solver.total_batch == 256
    assert default_config_for(256).name == "megdet_r50_fpn_bs256.yaml"
    assert default_config_for(16).name == default_config_for(32).name == "megdet_r50_fpn_bs16.yaml"
    assert sorted(p.name for p in bundled_configs().glob("*.yaml")) == sorted(
        p.name for p in (REPO / "configs").glob("*.yaml")
    )


def test_cli_reports_bad_config_in_one_line(tmp_path: Path) -> None:
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "megdet_hpc.train",
            "--config",
            str(REPO / "configs/demo_cpu.yaml"),
            "solver.max_iter=oops",
            f"train.output_dir={tmp_path}/out",
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "megdet_hpc.train: error: solver.max_iter: expected an integer, got 'oops'"
    ]
    assert not (tmp_path / "out").exists()
