"""Distributed inference over a COCO split and bbox evaluation with pycocotools.

Every rank runs the detector on its shard (``index % world == rank``), detections are converted to
COCO results (original image and category ids, xywh boxes) and gathered to rank 0, which runs
``COCOeval`` and writes ``bbox_results.json``, ``metrics.json`` (the 12 standard numbers and the AP of
every class), ``summary.txt`` (pycocotools' own 12-line table, also logged) and ``pr_curves.png`` (``plots``)
(precision-recall per class at IoU 0.5).  CGBN layers are in eval mode and use running statistics.

Inference can be interrupted: with ``should_stop`` every batch ends with a one-element allreduce (the
same number of batches on every rank), and when any rank's callback says stop -- a preemption signal
arrived -- all ranks stop at the same batch and ``evaluate`` returns None.  A COCO-size evaluation
outlasts Slurm's signal lead time; waiting for it would lose the preemption checkpoint.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pycocotools.cocoeval import COCOeval

from megdet_hpc.data.coco import CocoDetection, to_float
from megdet_hpc.distributed import Comm
from megdet_hpc.utils.logger import progress_bar

log = logging.getLogger("megdet_hpc.evaluation")
METRIC_NAMES = ["AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl"]


class EvaluationInterrupted(Exception):
    """A preemption signal stopped an evaluation between batches (every rank at the same batch)."""


@torch.no_grad()
def inference(
    model: torch.nn.Module,
    dataset: CocoDetection,
    comm: Comm,
    device: torch.device,
    max_images: int = 0,
    batch_size: int = 2,
    should_stop: Callable[[], bool] | None = None,
) -> list[dict[str, Any]] | None:
    """Detections of every rank (gathered to all); None when interrupted through ``should_stop``."""
    count = len(dataset) if max_images <= 0 else min(max_images, len(dataset))
    mine = list(range(comm.rank, count, comm.size))
    batches = math.ceil(math.ceil(count / comm.size) / batch_size)  # the same on every rank
    was_training = model.training
    model.eval()
    results: list[dict[str, Any]] = []
    interrupted = False
    bar = progress_bar(count, "eval", comm.is_main, leave=False, unit="img")
    try:
        for b in range(batches):
            chunk = mine[b * batch_size : (b + 1) * batch_size]
            if chunk:
                results.extend(_detect(model, dataset, chunk, device))
            bar.update(len(chunk) * comm.size)
            if should_stop is not None:
                vote = torch.tensor([float(should_stop())], dtype=torch.float64).to(comm.device)
                comm.allreduce_(vote, name="megdet.eval_vote")
                if vote.item() > 0:
                    interrupted = True
                    break
    finally:
        bar.close()
        model.train(was_training)
    if interrupted:
        return None
    gathered = comm.allgather_object(results)
    return [r for part in gathered for r in part]


def _detect(
    model: torch.nn.Module, dataset: CocoDetection, indices: list[int], device: torch.device
) -> list[dict]:
    images, ids = [], []
    for idx in indices:
        image, target = dataset[idx]
        images.append(to_float(image.to(device, non_blocking=True)))
        ids.append(target["image_id"])
    out = []
    for image_id, det in zip(ids, model(images)):
        boxes = det["boxes"].float().cpu()
        boxes[:, 2:] -= boxes[:, :2]
        for box, score, label in zip(boxes.tolist(), det["scores"].tolist(), det["labels"].tolist()):
            out.append(
                {
                    "image_id": image_id,
                    "category_id": dataset.label_to_cat[label],
                    "bbox": [round(v, 2) for v in box],
                    "score": round(score, 4),
                }
            )
    return out


def coco_bbox_metrics(
    dataset: CocoDetection, results: list[dict[str, Any]], image_ids: list[int]
) -> dict[str, Any]:
    """COCO bbox metrics (0..1): the 12 standard numbers, ``per_class`` AP, the ``summary`` text and the
    ``precision`` array (IoU x recall x class) for the PR plot."""
    empty = {name: 0.0 for name in METRIC_NAMES}
    if not results:
        names = dataset.category_names
        return {
            **empty,
            "per_class": {names[k]: 0.0 for k in sorted(names)},
            "summary": "no detections",
            "precision": None,
        }
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        dets = dataset.coco.loadRes(results)
        ev = COCOeval(dataset.coco, dets, "bbox")
        ev.params.imgIds = image_ids
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    metrics: dict[str, Any] = {name: float(ev.stats[i]) for i, name in enumerate(METRIC_NAMES)}
    precision = ev.eval["precision"]  # [T iou, R recall, K class, A area, M max dets]
    per_class = {}
    for k, cat_id in enumerate(ev.params.catIds):
        p = precision[:, :, k, 0, -1]
        p = p[p > -1]
        label = dataset.cat_to_label[cat_id]
        per_class[dataset.category_names[label]] = float(p.mean()) if p.size else float("nan")
    metrics["per_class"] = per_class
    metrics["summary"] = "\n".join(
        line for line in out.getvalue().splitlines() if line.startswith(" Average")
    )
    metrics["precision"] = precision
    return metrics


def plot_pr_curves(dataset: CocoDetection, precision: np.ndarray, path: Path) -> Path:
    """Precision-recall per class at IoU 0.5 (all areas, 100 detections), one panel per class."""
    from megdet_hpc.utils.plotting import pyplot, save

    plt = pyplot()

    names = [dataset.category_names[k] for k in sorted(dataset.category_names)]
    cols = min(4, len(names))
    rows = math.ceil(len(names) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.8 * rows), squeeze=False)
    recall = np.linspace(0, 1, precision.shape[1])
    for k, name in enumerate(names):
        ax = axes[k // cols][k % cols]
        curve = precision[0, :, k, 0, -1]
        valid = curve > -1
        ap = curve[valid].mean() if valid.any() else float("nan")
        ax.plot(recall[valid], curve[valid])
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.02)
        ax.set_title(f"{name}: AP50 {ap:.3f}", fontsize=9)
        ax.set_xlabel("recall", fontsize=8)
        ax.set_ylabel("precision", fontsize=8)
        ax.grid(alpha=0.3)
    for k in range(len(names), rows * cols):
        axes[k // cols][k % cols].axis("off")
    return save(fig, path)


def evaluate(
    model: torch.nn.Module,
    dataset: CocoDetection,
    comm: Comm,
    device: torch.device,
    output_dir: Path | None = None,
    max_images: int = 0,
    should_stop: Callable[[], bool] | None = None,
    plots: bool = True,
) -> dict[str, Any]:
    """Inference on every rank, metrics on rank 0, broadcast to all; writes the files listed in the
    module docstring when ``output_dir`` is given.  ``EvaluationInterrupted`` when ``should_stop``
    stopped it."""
    results = inference(model, dataset, comm, device, max_images, should_stop=should_stop)
    if results is None:
        raise EvaluationInterrupted("evaluation interrupted by a signal")
    metrics: dict[str, Any] = {}
    if comm.is_main:
        count = len(dataset) if max_images <= 0 else min(max_images, len(dataset))
        full = coco_bbox_metrics(dataset, results, dataset.ids[:count])
        precision = full.pop("precision")
        log.info("COCO bbox evaluation on %d images:\n%s", count, full["summary"])
        metrics = full
        if output_dir is not None:
            output_dir.mkdir(parents=True, exist_ok=True)
            (output_dir / "bbox_results.json").write_text(json.dumps(results))
            (output_dir / "metrics.json").write_text(
                json.dumps({k: v for k, v in full.items() if k != "summary"}, indent=2)
            )
            (output_dir / "summary.txt").write_text(full["summary"] + "\n")
            if plots and precision is not None:
                plot_pr_curves(dataset, precision, output_dir / "pr_curves.png")
    return comm.broadcast_object(metrics, root=0)
