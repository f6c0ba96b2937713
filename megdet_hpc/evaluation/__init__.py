"""Evaluation: distributed inference, COCO bbox metrics (pycocotools), PR curves and drawings."""

from megdet_hpc.evaluation.coco_eval import (
    METRIC_NAMES,
    EvaluationInterrupted,
    coco_bbox_metrics,
    evaluate,
    inference,
)

__all__ = ["METRIC_NAMES", "EvaluationInterrupted", "coco_bbox_metrics", "evaluate", "inference"]
