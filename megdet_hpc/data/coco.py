"""COCO-format detection datasets through pycocotools.

Annotations are cleaned the way detectron2/torchvision references do, but counted instead of silently
dropped: crowd boxes (``iscrowd=1``) and degenerate boxes (width or height < 1 px after clipping) are
removed; images left without boxes are skipped for training (kept for evaluation).  COCO category ids
are mapped to contiguous labels 1..K (0 is background) and back for evaluation.
"""

from __future__ import annotations

import contextlib
import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from pycocotools.coco import COCO


class DataError(ValueError):
    """Missing or malformed dataset files, with a one-line message."""


@dataclass
class FilterStats:
    crowd: int = 0
    degenerate: int = 0
    empty_images: int = 0
    kept_boxes: int = 0
    per_image: dict[int, int] = field(default_factory=dict)


def load_coco(annotations: str | Path) -> COCO:
    path = Path(annotations)
    if not path.is_file():
        raise DataError(f"annotation file not found: {path}")
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            return COCO(str(path))
    except Exception as exc:  # pycocotools raises bare AssertionError/JSONDecodeError
        raise DataError(f"{path}: not a valid COCO instances file ({type(exc).__name__}: {exc})") from exc


class CocoDetection(torch.utils.data.Dataset):
    """Images + cleaned targets ``{"boxes" (xyxy float), "labels", "image_id"}``."""

    def __init__(self, images: str | Path, annotations: str | Path, train: bool, flip_prob: float = 0.0):
        self.root = Path(images)
        if not self.root.is_dir():
            raise DataError(f"image folder not found: {self.root}")
        self.coco = load_coco(annotations)
        self.train = train
        self.flip_prob = flip_prob if train else 0.0
        cat_ids = sorted(self.coco.getCatIds())
        if not cat_ids:
            raise DataError(f"{annotations}: no categories")
        self.cat_to_label = {c: i + 1 for i, c in enumerate(cat_ids)}
        self.label_to_cat = {i + 1: c for i, c in enumerate(cat_ids)}
        self.stats = FilterStats()
        self.targets: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        ids = sorted(self.coco.getImgIds())
        self.ids = []
        for image_id in ids:
            boxes, labels = self._clean(image_id)
            if train and len(boxes) == 0:
                self.stats.empty_images += 1
                continue
            self.targets[image_id] = (boxes, labels)
            self.ids.append(image_id)
        if not self.ids:
            raise DataError(f"{annotations}: no usable images")
        info = self.coco.imgs
        self.aspect_ratios = [info[i]["width"] / max(info[i]["height"], 1) for i in self.ids]

    def _clean(self, image_id: int) -> tuple[torch.Tensor, torch.Tensor]:
        info = self.coco.imgs[image_id]
        w, h = info["width"], info["height"]
        boxes, labels = [], []
        for ann in self.coco.imgToAnns.get(image_id, []):
            if ann.get("iscrowd", 0):
                self.stats.crowd += 1
                continue
            x, y, bw, bh = ann["bbox"]
            x0, y0 = max(0.0, x), max(0.0, y)
            x1, y1 = min(float(w), x + bw), min(float(h), y + bh)
            if x1 - x0 < 1 or y1 - y0 < 1 or ann["category_id"] not in self.cat_to_label:
                self.stats.degenerate += 1
                continue
            boxes.append([x0, y0, x1, y1])
            labels.append(self.cat_to_label[ann["category_id"]])
        self.stats.kept_boxes += len(boxes)
        return (
            torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
            torch.tensor(labels, dtype=torch.int64),
        )

    def __len__(self) -> int:
        return len(self.ids)

    def load_image(self, image_id: int) -> torch.Tensor:
        path = self.root / self.coco.imgs[image_id]["file_name"]
        try:
            with Image.open(path) as img:
                array = np.asarray(img.convert("RGB"))
        except (OSError, ValueError) as exc:
            raise DataError(f"cannot read image {path}: {exc}") from exc
        return torch.from_numpy(array.copy()).permute(2, 0, 1).float().div_(255.0)

    def __getitem__(self, key: Any) -> tuple[torch.Tensor, dict[str, Any]]:
        """``key`` is an index, or ``(index, flip_seed)`` from the sampler for reproducible flips."""
        index, flip_seed = key if isinstance(key, tuple) else (key, None)
        image_id = self.ids[index]
        image = self.load_image(image_id)
        boxes, labels = self.targets[image_id]
        boxes = boxes.clone()
        if self.flip_prob > 0:
            gen = torch.Generator().manual_seed(int(flip_seed if flip_seed is not None else index))
            if torch.rand((), generator=gen).item() < self.flip_prob:
                image = image.flip(-1)
                width = image.shape[-1]
                boxes[:, [0, 2]] = width - boxes[:, [2, 0]]
        return image, {"boxes": boxes, "labels": labels, "image_id": image_id}
