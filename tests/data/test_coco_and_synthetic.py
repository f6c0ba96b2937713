"""Synthetic COCO data and the COCO dataset: mapping, filtering with counts, flips, errors."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megdet_hpc.data.coco import CocoDetection, DataError, to_float
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
    assert ds.cat_to_label == {1: 1, 3: 2, 7: 3} and ds.category_names[2] == "ellipse"
    assert (
        f"{ds.stats.crowd} crowd" in ds.stats.summary()
        and f"{ds.stats.kept_boxes} boxes kept" in ds.stats.summary()
    )
    image, target = ds[0]
    assert image.shape == (3, 64, 64) and image.dtype == torch.uint8  # converted to float on the device
    assert 0 <= to_float(image).min() <= to_float(image).max() <= 1
    boxes = target["boxes"]
    assert (boxes[:, 2] > boxes[:, 0]).all() and (boxes[:, 3] > boxes[:, 1]).all()
    assert set(target["labels"].tolist()) <= {1, 2, 3}


def test_empty_images_skipped_for_training_kept_for_eval(tmp_path: Path) -> None:
    root = generate(tmp_path / "d", train=100, val=3, size=64, seed=0)  # image 97 is empty
    train = CocoDetection(root / "train", root / "annotations/instances_train.json", train=True)
    evals = CocoDetection(root / "train", root / "annotations/instances_train.json", train=False)
    assert train.stats.empty_images == 1 and len(train) == 99 and len(evals) == 100


def test_flip_mirrors_boxes(tiny_data: Path) -> None:
    ds = CocoDetection(
        tiny_data / "train", tiny_data / "annotations/instances_train.json", train=True, flip_prob=1.0
    )
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


def _broken(tmp_path: Path, tiny_data: Path, change) -> Path:  # type: ignore[no-untyped-def]
    data = json.loads((tiny_data / "annotations/instances_train.json").read_text())
    change(data)
    path = tmp_path / "broken.json"
    path.write_text(json.dumps(data))
    return path


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda d: d.pop("categories"), "no 'categories' list"),
        (lambda d: d["images"][2].pop("width"), "image #2 (id 3) has no integer 'width'"),
        (lambda d: d["images"][0].pop("file_name"), "image id 1 has no 'file_name'"),
        (lambda d: d["annotations"][4].pop("bbox"), "(#4) has no 'bbox'"),
        (lambda d: d["annotations"][1].update(bbox=[1, 2, 3]), "expected 4 finite numbers"),
        (lambda d: d["annotations"][0].update(bbox=[float("nan"), 1, 5, 5]), "has bbox [nan, 1, 5, 5]"),
        (lambda d: d["annotations"][0].pop("category_id"), "has no integer 'category_id'"),
    ],
)
def test_malformed_annotations_are_one_line_errors(
    tmp_path: Path, tiny_data: Path, change, message: str
) -> None:
    path = _broken(tmp_path, tiny_data, change)
    with pytest.raises(DataError, match=re.escape(message)) as info:
        CocoDetection(tiny_data / "train", path, train=True)
    assert "\n" not in str(info.value) and str(path) in str(info.value)


def test_unknown_categories_are_counted_and_sizes_checked(tmp_path: Path, tiny_data: Path) -> None:
    def change(d: dict) -> None:
        d["annotations"][0]["category_id"] = 99
        d["images"][0]["width"] = 32  # the JPEG is 64 px wide

    ds = CocoDetection(tiny_data / "train", _broken(tmp_path, tiny_data, change), train=True)
    assert ds.stats.unknown_category == 1 and "1 unknown category" in ds.stats.summary()
    with pytest.raises(DataError, match="train_000001.jpg is 64x64 but broken.json says 32x64"):
        ds.load_image(1)


def test_generator_cli(tmp_path: Path) -> None:
    ok = subprocess.run(
        [
            sys.executable,
            "-m",
            "megdet_hpc.data.synthetic",
            "--out",
            str(tmp_path / "s"),
            "--train",
            "3",
            "--val",
            "2",
            "--size",
            "48",
        ],
        capture_output=True,
        text=True,
    )
    assert ok.returncode == 0 and (tmp_path / "s/annotations/instances_val.json").exists()
    bad = subprocess.run(
        [sys.executable, "-m", "megdet_hpc.data.synthetic", "--out", str(tmp_path / "t"), "--size", "8"],
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 2 and "error:" in bad.stderr


def test_a_kept_parse_is_handed_over_once_and_only_for_the_unchanged_file(
    tiny_data: Path, tmp_path: Path
) -> None:
    """train.py checks the annotation file before importing torch and hands that parse to the dataset
    (``keep``): taken once, and never for a file changed since."""
    import os

    from megdet_hpc.data.annotations import load_coco

    path = tmp_path / "instances.json"
    path.write_text((tiny_data / "annotations" / "instances_train.json").read_text())
    kept = load_coco(path, keep=True)
    assert load_coco(path) is kept  # handed over
    assert load_coco(path) is not kept  # once
    kept = load_coco(path, keep=True)
    content = json.loads(path.read_text())
    content["images"] = content["images"][:3]
    path.write_text(json.dumps(content))
    os.utime(path, ns=(1, 1))  # even a rewrite within the clock's resolution differs in mtime or size
    changed = load_coco(path)
    assert changed is not kept and len(changed.imgs) == 3
