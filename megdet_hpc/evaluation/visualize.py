"""Pictures of what the detector sees: predictions beside the ground truth, as a PNG grid.

Each validation image appears twice, side by side: ground truth (green) and the predictions above a
score threshold (orange, with class and score), drawn with torchvision's ``draw_bounding_boxes`` and
tiled with ``make_grid`` -- the view detectron2's ``Visualizer`` gives.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torchvision.utils import draw_bounding_boxes, make_grid, save_image

from megdet_hpc.data.coco import CocoDetection, to_float

GT_COLOR = "lime"
PRED_COLOR = "orange"


def _draw(image: torch.Tensor, boxes: torch.Tensor, labels: list[str], color: str) -> torch.Tensor:
    if boxes.numel() == 0:  # torchvision warns on an empty box list
        return image
    return draw_bounding_boxes(image, boxes, labels, colors=color, width=2)


@torch.no_grad()
def draw_predictions(
    model: torch.nn.Module,
    dataset: CocoDetection,
    device: torch.device,
    count: int,
    path: Path,
    score_threshold: float = 0.5,
    indices: list[int] | None = None,
) -> Path:
    """Draw ``count`` validation images (or ``indices``) into ``path``."""
    chosen = indices if indices is not None else list(range(min(count, len(dataset))))
    was_training = model.training
    model.eval()
    tiles = []
    try:
        for idx in chosen:
            image, target = dataset[idx]
            det = model([to_float(image.to(device))])[0]
            keep = det["scores"] >= score_threshold
            names = dataset.category_names
            truth_labels = [names[int(c)] for c in target["labels"]]
            pred_labels = [
                f"{names[int(c)]} {s:.2f}"
                for c, s in zip(det["labels"][keep].tolist(), det["scores"][keep].tolist())
            ]
            tiles.append(_draw(image, target["boxes"], truth_labels, GT_COLOR))
            tiles.append(_draw(image, det["boxes"][keep].float().cpu(), pred_labels, PRED_COLOR))
    finally:
        model.train(was_training)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_image(make_grid([to_float(t) for t in tiles], nrow=4, padding=4, pad_value=1.0), path)
    return path
