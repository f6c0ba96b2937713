"""Distributed inference over a COCO split and bbox evaluation with pycocotools.

Every rank runs the detector on its shard (``index % world == rank``), detections are converted to
COCO results (original image and category ids, xywh boxes) and gathered to rank 0, which runs
``COCOeval`` and writes ``bbox_results.json`` and ``metrics.json``.  CGBN layers are in eval mode and
use running statistics: inference communicates only the final gather.
"""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path
from typing import Any

import torch
from pycocotools.cocoeval import COCOeval

from megdet_hpc.data.coco import CocoDetection
from megdet_hpc.distributed import Comm
from megdet_hpc.utils_logging import progress_bar

METRIC_NAMES = ["AP", "AP50", "AP75", "APs", "APm", "APl"]


@torch.no_grad()
def inference(model: torch.nn.Module, dataset: CocoDetection, comm: Comm, device: torch.device,
              max_images: int = 0, batch_size: int = 2) -> list[dict[str, Any]]:  # fmt: skip
    count = len(dataset) if max_images <= 0 else min(max_images, len(dataset))
    mine = list(range(comm.rank, count, comm.size))
    was_training = model.training
    model.eval()
    results: list[dict[str, Any]] = []
    bar = progress_bar(count, "eval", comm.is_main, leave=False, unit="img")
    for start in range(0, len(mine), batch_size):
        chunk = mine[start : start + batch_size]
        images, ids = [], []
        for idx in chunk:
            image, target = dataset[idx]
            images.append(image.to(device))
            ids.append(target["image_id"])
        outputs = model(images)
        for image_id, out in zip(ids, outputs):
            boxes = out["boxes"].cpu()
            boxes[:, 2:] -= boxes[:, :2]
            for box, score, label in zip(boxes.tolist(), out["scores"].tolist(), out["labels"].tolist()):
                results.append({"image_id": image_id, "category_id": dataset.label_to_cat[label],
                                "bbox": [round(v, 2) for v in box], "score": round(score, 4)})  # fmt: skip
        bar.update(len(chunk) * comm.size)
    bar.close()
    model.train(was_training)
    gathered = comm.allgather_object(results)
    return [r for part in gathered for r in part]


def coco_bbox_metrics(dataset: CocoDetection, results: list[dict[str, Any]], image_ids: list[int]) -> dict:
    """COCO bbox AP metrics (0..1) for ``results`` over ``image_ids``."""
    if not results:
        return {name: 0.0 for name in METRIC_NAMES}
    with contextlib.redirect_stdout(io.StringIO()):
        dets = dataset.coco.loadRes(results)
        ev = COCOeval(dataset.coco, dets, "bbox")
        ev.params.imgIds = image_ids
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return {name: float(ev.stats[i]) for i, name in enumerate(METRIC_NAMES)}


def evaluate(model: torch.nn.Module, dataset: CocoDetection, comm: Comm, device: torch.device,
             output_dir: Path | None = None, max_images: int = 0) -> dict[str, float]:  # fmt: skip
    """Inference on every rank, metrics on rank 0, broadcast to all; writes JSON files when asked."""
    results = inference(model, dataset, comm, device, max_images)
    metrics: dict[str, float] = {}
    if comm.is_main:
        count = len(dataset) if max_images <= 0 else min(max_images, len(dataset))
        metrics = coco_bbox_metrics(dataset, results, dataset.ids[:count])
        if output_dir is not None:
            output_dir.mkdir(parents=True, exist_ok=True)
            (output_dir / "bbox_results.json").write_text(json.dumps(results))
            (output_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return comm.broadcast_object(metrics, root=0)
