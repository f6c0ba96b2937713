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
