"""COCO evaluation: perfect detections score AP 1, shifted boxes score less, gather is complete."""

from __future__ import annotations

from pathlib import Path

import pytest

from megdet_hpc.data.coco import CocoDetection
from megdet_hpc.evaluation import coco_bbox_metrics


@pytest.fixture
def val(tiny_data: Path) -> CocoDetection:
    return CocoDetection(tiny_data / "val", tiny_data / "annotations/instances_val.json", train=False)


def ground_truth_as_detections(ds: CocoDetection, shift: float = 0.0) -> list[dict]:
    out = []
    for image_id in ds.ids:
        boxes, labels = ds.targets[image_id]
        for box, label in zip(boxes.tolist(), labels.tolist()):
            x0, y0, x1, y1 = box
            out.append(
                {
                    "image_id": image_id,
                    "category_id": ds.label_to_cat[label],
                    "bbox": [x0 + shift, y0 + shift, x1 - x0, y1 - y0],
                    "score": 0.9,
                }
            )
    return out


def test_perfect_detections_score_one(val: CocoDetection) -> None:
    m = coco_bbox_metrics(val, ground_truth_as_detections(val), val.ids)
    assert m["AP"] == pytest.approx(1.0) and m["AP50"] == pytest.approx(1.0)


def test_shifted_detections_score_less(val: CocoDetection) -> None:
    m = coco_bbox_metrics(val, ground_truth_as_detections(val, shift=6.0), val.ids)
    assert m["AP"] < 0.9 and m["AP50"] <= 1.0


def test_no_detections_score_zero(val: CocoDetection) -> None:
    assert coco_bbox_metrics(val, [], val.ids)["AP"] == 0.0


def test_per_class_ap_summary_and_pr_curves(val: CocoDetection, tmp_path: Path) -> None:
    from megdet_hpc.evaluation.coco_eval import plot_pr_curves

    m = coco_bbox_metrics(val, ground_truth_as_detections(val), val.ids)
    assert set(m["per_class"]) == {"rectangle", "ellipse", "triangle"}
    assert all(ap == pytest.approx(1.0) for ap in m["per_class"].values())
    assert len(m["summary"].splitlines()) == 12 and m["summary"].startswith(" Average Precision")
    assert m["AR100"] == pytest.approx(1.0)
    png = plot_pr_curves(val, m["precision"], tmp_path / "pr.png")
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_predictions_are_drawn_beside_the_ground_truth(val: CocoDetection, tmp_path: Path) -> None:
    import torch

    from megdet_hpc.config import load_config
    from megdet_hpc.evaluation.visualize import draw_predictions
    from megdet_hpc.modeling import build_model

    model = build_model(
        load_config(
            None, ["model.backbone=resnet18", "model.num_classes=3", "model.min_size=64", "model.max_size=64"]
        )
    )
    path = draw_predictions(model, val, torch.device("cpu"), 3, tmp_path / "grid.png", score_threshold=0.0)
    from PIL import Image

    with Image.open(path) as img:
        assert img.width > 4 * 64 and img.height >= 64  # 3 images x (truth, predictions), 4 per row
    assert model.training  # restored


def test_visualize_without_a_checkpoint_is_a_one_line_error(tiny_config, tmp_path: Path) -> None:
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, "-m", "megdet_hpc.visualize", "--config", str(tiny_config())],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"megdet_hpc.visualize: error: no usable checkpoint in {tmp_path / 'out'}"
    ]
