"""Synthetic COCO data and the COCO dataset: mapping, filtering with counts, flips, errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megdet_hpc.data.coco import CocoDetection, DataError
from megdet_hpc.data.synthetic import generate


def test_synthetic_is_real_coco_and_deterministic(tmp_path: Path) -> None:
    a = generate(tmp_path / "a", train=30, val=5, size=64, seed=3)
    b = generate(tmp_path / "b", train=30, val=5, size=64, seed=3)
    ja = json.loads((a / "annotations/instances_train.json").read_text())
    jb = json.loads((b / "annotations/instances_train.json").read_text())
    assert ja == jb
    assert [c["id"] for c in ja["categories"]] == [1, 3, 7]
    assert len(list((a / "train").glob("*.jpg"))) == 30
    assert (a / "train/train_000001.jpg").read_bytes() == (b / "train/train_000001.jpg").read_bytes()
    c = generate(tmp_path / "c", train=30, val=5, size=64, seed=4)
    assert json.loads((c / "annotations/instances_train.json").read_text()) != ja


def test_dataset_filters_and_counts(tiny_data: Path) -> None:
    ds = CocoDetection(tiny_data / "train", tiny_data / "annotations/instances_train.json", train=True)
    raw = json.loads((tiny_data / "annotations/instances_train.json").read_text())
    crowd = sum(a["iscrowd"] for a in raw["annotations"])
    assert ds.stats.crowd == crowd > 0
    assert ds.stats.degenerate >= 1
    assert ds.stats.kept_boxes + ds.stats.crowd + ds.stats.degenerate == len(raw["annotations"])
    assert ds.cat_to_label == {1: 1, 3: 2, 7: 3}
    image, target = ds[0]
    assert (
        image.shape == (3, 64, 64) and image.dtype == torch.float32 and 0 <= image.min() <= image.max() <= 1
    )
    boxes = target["boxes"]
    assert (boxes[:, 2] > boxes[:, 0]).all() and (boxes[:, 3] > boxes[:, 1]).all()
    assert set(target["labels"].tolist()) <= {1, 2, 3}


def test_empty_images_skipped_for_training_kept_for_eval(tmp_path: Path) -> None:
    root = generate(tmp_path / "d", train=100, val=3, size=64, seed=0)  # image 97 is empty
    train = CocoDetection(root / "train", root / "annotations/instances_train.json", train=True)
    evals = CocoDetection(root / "train", root / "annotations/instances_train.json", train=False)
    assert train.stats.empty_images == 1 and len(train) == 99 and len(evals) == 100


def test_flip_mirrors_boxes(tiny_data: Path) -> None:
    ds = CocoDetection(tiny_data / "train", tiny_data / "annotations/instances_train.json", train=True,
                       flip_prob=1.0)  # fmt: skip
    plain = CocoDetection(tiny_data / "train", tiny_data / "annotations/instances_train.json", train=True)
    img_f, t_f = ds[(0, 5)]
    img, t = plain[0]
    assert torch.equal(img_f, img.flip(-1))
    assert torch.allclose(t_f["boxes"][:, 0], 64 - t["boxes"][:, 2])


def test_missing_or_broken_files_are_clear_errors(tmp_path: Path, tiny_data: Path) -> None:
    with pytest.raises(DataError, match="image folder not found"):
        CocoDetection(tmp_path / "none", tiny_data / "annotations/instances_train.json", train=True)
    with pytest.raises(DataError, match="annotation file not found"):
        CocoDetection(tiny_data / "train", tmp_path / "x.json", train=True)
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(DataError, match="not a valid COCO instances file"):
        CocoDetection(tiny_data / "train", tmp_path / "bad.json", train=True)


def test_generator_cli(tmp_path: Path) -> None:
    ok = subprocess.run([sys.executable, "-m", "megdet_hpc.data.synthetic", "--out", str(tmp_path / "s"),
                         "--train", "3", "--val", "2", "--size", "48"], capture_output=True, text=True)  # fmt: skip
    assert ok.returncode == 0 and (tmp_path / "s/annotations/instances_val.json").exists()
    bad = subprocess.run([sys.executable, "-m", "megdet_hpc.data.synthetic", "--out", str(tmp_path / "t"),
                          "--size", "8"], capture_output=True, text=True)  # fmt: skip
    assert bad.returncode == 2 and "error:" in bad.stderr
