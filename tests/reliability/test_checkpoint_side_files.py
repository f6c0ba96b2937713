"""Broken checkpoint side files and checkpoint files that are not what they claim.

Every case starts from a copy of one finished run (checkpoints 2, 4, 6 with manifests and the
``last_checkpoint`` pointer), breaks one file the way a crash, a copy or a user does, and runs the
real CLI: a fallback with a warning that names the file, or a one-line error -- never a traceback --
and nothing the earlier run wrote is changed.
"""

from __future__ import annotations

import copy
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from conftest import TINY_OVERRIDES, write_tiny_config
from test_faults import one_line_error, train, tree

TRAIN_SECTION = {"checkpoint_period": 2, "keep_checkpoints": 3, "eval_at_end": False}


@pytest.fixture(scope="module")
def base_run(tiny_data: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path]:
    """(config as a dict, output dir) of one 6-iteration run, shared by the module's cases."""
    folder = tmp_path_factory.mktemp("base")
    solver = {**TINY_OVERRIDES["solver"], "max_iter": 6}
    train_section = {**TINY_OVERRIDES["train"], **TRAIN_SECTION}
    cfg = write_tiny_config(folder, tiny_data, "base.yaml", solver=solver, train=train_section)
    data = yaml.safe_load(cfg.read_text())
    proc, _ = train(cfg)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return data, folder / "out"


def fork(base_run: tuple[dict, Path], tmp_path: Path, **model: object) -> tuple[Path, Path]:
    """A copy of the base run and a config that points at it."""
    data, out = base_run
    data = copy.deepcopy(data)
    data["model"].update(model)
    data["train"]["output_dir"] = str(tmp_path / "out")
    shutil.copytree(out, tmp_path / "out")
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump(data))
    return cfg, tmp_path / "out"


def _manifest_list(out: Path) -> None:
    (out / "model_0000006.json").write_text("[1, 2, 3]")


def _manifest_binary(out: Path) -> None:
    (out / "model_0000006.json").write_bytes(b"\xff\xfe\x00garbage\x80")


def _zero_byte_newest(out: Path) -> None:
    (out / "model_0000006.json").unlink()
    (out / "model_0000006.pth").write_bytes(b"")


def _truncated_newest_without_manifest(out: Path) -> None:
    (out / "model_0000006.json").unlink()
    path = out / "model_0000006.pth"
    path.write_bytes(path.read_bytes()[:5000])


# case -> (break it, resumed from, the warning's words)
FALLBACKS = {
    "manifest is a JSON list": (_manifest_list, 4, "model_0000006.json: unreadable manifest (a JSON list"),
    "manifest is not UTF-8": (_manifest_binary, 4, "model_0000006.json: unreadable manifest (not UTF-8"),
    "zero-byte checkpoint": (_zero_byte_newest, 4, "not a PyTorch file (an empty file (0 bytes))"),
    "truncated checkpoint without manifest": (
        _truncated_newest_without_manifest,
        4,
        "model_0000006.pth: cannot be loaded: not a readable PyTorch file",
    ),
    "pointer not UTF-8": (
        lambda out: (out / "last_checkpoint").write_bytes(b"\xffmodel\x80"),
        6,
        "last_checkpoint is not UTF-8 text",
    ),
    "pointer holds garbage": (
        lambda out: (out / "last_checkpoint").write_text("hello world\n"),
        6,
        "last_checkpoint holds 'hello world', not a checkpoint name",
    ),
    "pointer names a missing file": (
        lambda out: (out / "last_checkpoint").write_text("model_0000099.pth\n"),
        6,
        "last_checkpoint names model_0000099.pth, which is not a checkpoint in",
    ),
}


@pytest.mark.parametrize("case", sorted(FALLBACKS))
def test_a_broken_side_file_falls_back_with_a_warning(base_run, tmp_path: Path, case: str) -> None:
    brk, resumed, warning = FALLBACKS[case]
    cfg, out = fork(base_run, tmp_path)
    brk(out)
    used = f"model_{resumed:07d}.pth"
    kept = tree(out)[used]
    proc, _ = train(cfg, f"solver.max_iter={resumed + 1}")
    text = proc.stdout + proc.stderr
    assert proc.returncode == 0, text[-3000:]
    assert "Traceback" not in text
    assert warning in text, text[-3000:]
    assert f"model_{resumed:07d}.pth at iteration {resumed}" in proc.stdout
    assert tree(out)[used] == kept  # the checkpoint resumed from is untouched


def test_a_jpeg_renamed_pth_is_called_a_jpeg(base_run, tiny_data: Path, tmp_path: Path) -> None:
    cfg, out = fork(base_run, tmp_path)
    fake = tmp_path / "weights.pth"
    shutil.copy(next((tiny_data / "train").glob("*.jpg")), fake)
    before = tree(out)
    proc, _ = train(cfg, "--resume-from", str(fake), "solver.max_iter=8")
    assert proc.returncode == 2
    line = one_line_error(proc)
    assert "weights.pth: cannot be loaded: not a PyTorch file (a JPEG image)" in line, line
    assert "could run code" not in line
    assert {k: v for k, v in tree(out).items() if k != "log.txt"} == {
        k: v for k, v in before.items() if k != "log.txt"
    }


def test_evaluate_with_another_num_classes_names_the_difference(base_run, tmp_path: Path) -> None:
    cfg, out = fork(base_run, tmp_path, num_classes=5)
    proc, _ = _evaluate(cfg)
    assert proc.returncode == 2
    line = one_line_error(proc, "megdet_hpc.evaluate")
    assert "model_0000006.pth was trained with another model (model.num_classes: 3 -> 5)" in line, line
    # A bare state_dict (no config inside) names the tensors that do not fit.
    bare = tmp_path / "bare.pth"
    state = torch.load(out / "model_0000006.pth", weights_only=True)
    torch.save({"model": state["model"]}, bare)
    proc, _ = _evaluate(cfg, "--checkpoint", str(bare))
    assert proc.returncode == 2
    line = one_line_error(proc, "megdet_hpc.evaluate")
    assert "bare.pth: weights do not fit the model: 4 of another shape" in line, line
    assert "roi_heads.box_predictor.cls_score.weight: [4, 64] in the file, [6, 64] in the model" in line, line


def _evaluate(cfg: Path, *extra: str):  # type: ignore[no-untyped-def]
    from test_faults import timed

    return timed("single", 1, ["-m", "megdet_hpc.evaluate", "--config", str(cfg), *extra])


def test_pruning_keeps_verified_checkpoints_and_never_a_users_copy(base_run, tmp_path: Path) -> None:
    """A .pth without manifest (a fork) neither counts toward keep_checkpoints nor is deleted; a
    manifest whose .pth is gone (a kill between the two deletes of a pruning) is removed at start."""
    _, out_base = base_run
    cfg, out = fork(base_run, tmp_path)
    for name in ("model_0000002", "model_0000004", "model_0000006"):
        (out / f"{name}.pth").unlink()
        (out / f"{name}.json").unlink()
    (out / "last_checkpoint").unlink()
    shutil.copy(out_base / "model_0000006.pth", out)  # the user's copy: no manifest
    shutil.copy(out_base / "model_0000004.json", out)  # a half-pruned checkpoint: manifest only
    users = tree(out)["model_0000006.pth"]
    proc, _ = train(cfg, "solver.max_iter=12", "train.keep_checkpoints=2")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "removed 1 manifest(s) whose checkpoint is gone" in proc.stdout + proc.stderr
    names = sorted(p.name for p in out.glob("model_*"))
    assert names == [
        "model_0000006.pth",
        "model_0000010.json",
        "model_0000010.pth",
        "model_0000012.json",
        "model_0000012.pth",
    ], names
    assert tree(out)["model_0000006.pth"] == users
