"""COCO-format detection datasets through pycocotools.

The annotation file is checked before use: every image needs ``id``, ``file_name``, ``width`` and
``height``, every annotation ``image_id``, ``category_id`` and a ``bbox`` of 4 finite numbers, and there
must be ``categories`` -- a violation is a one-line ``DataError`` naming the file and the entry (a
``NaN`` coordinate would otherwise become a full-width box).  Annotations are then cleaned the way
detectron2 and torchvision's references do, and every dropped one is counted by reason (``FilterStats``,
logged by the trainer): crowd regions, boxes that are empty once clipped to the image, and unknown
categories; images left without boxes are skipped for training (kept for evaluation).  COCO category
ids are mapped to contiguous labels 1..K (0 is background) and back for evaluation.

Images are returned as uint8 CHW tensors (4x fewer bytes to pin and copy than float32); the model
input is ``to_float(image)`` on the device.  A decoded image whose size differs from the one in the
JSON is a ``DataError``: boxes would silently be clipped to the wrong frame.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from pycocotools.coco import COCO

from megdet_hpc.utils.errors import UserError


class DataError(UserError, ValueError):
    """Missing or malformed dataset files, with a one-line message."""


@dataclass
class FilterStats:
    kept_boxes: int = 0
    crowd: int = 0
    degenerate: int = 0  # zero width or height once clipped to the image (or entirely outside it)
    unknown_category: int = 0
    empty_images: int = 0  # training images left without boxes (skipped)
    per_image: dict[int, int] = field(default_factory=dict)

    def summary(self) -> str:
        dropped = {
            "crowd": self.crowd,
            "degenerate": self.degenerate,
            "unknown category": self.unknown_category,
        }
        parts = [f"{count} {reason}" for reason, count in dropped.items() if count]
        text = f"{self.kept_boxes} boxes kept; dropped {', '.join(parts) if parts else 'none'}"
        if self.empty_images:
            text += f"; {self.empty_images} image(s) without boxes skipped"
        return text


def _where(path: Path) -> str:
    """``path``, and for a relative one the directory it was looked up from (jobs run elsewhere)."""
    return str(path) if path.is_absolute() else f"{path} (relative to {Path.cwd()})"


def to_float(image: torch.Tensor) -> torch.Tensor:
    """uint8 CHW image -> float in [0, 1] (the detector's input)."""
    return image.float().div_(255.0) if image.dtype == torch.uint8 else image


def _finite_numbers(values: Any, length: int) -> bool:
    return (
        isinstance(values, list)
        and len(values) == length
        and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in values)
    )


def _validate(data: Any, path: Path) -> None:
    """One-line DataError for the first structural problem of a COCO instances file."""
    if not isinstance(data, dict):
        raise DataError(f"{path}: not a COCO instances file (top level is a {type(data).__name__})")
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            raise DataError(f"{path}: no '{key}' list")
    for i, cat in enumerate(data["categories"]):
        if not isinstance(cat, dict) or not isinstance(cat.get("id"), int):
            raise DataError(f"{path}: category #{i} has no integer 'id'")
    for i, img in enumerate(data["images"]):
        if not isinstance(img, dict):
            raise DataError(f"{path}: image #{i} is not an object")
        for key in ("id", "width", "height"):
            if not isinstance(img.get(key), int) or isinstance(img.get(key), bool):
                raise DataError(f"{path}: image #{i} (id {img.get('id')}) has no integer '{key}'")
        if img["width"] <= 0 or img["height"] <= 0:
            raise DataError(f"{path}: image id {img['id']} has size {img['width']}x{img['height']}")
        if not isinstance(img.get("file_name"), str) or not img["file_name"]:
            raise DataError(f"{path}: image id {img['id']} has no 'file_name'")
    for i, ann in enumerate(data["annotations"]):
        if not isinstance(ann, dict):
            raise DataError(f"{path}: annotation #{i} is not an object")
        label = f"annotation id {ann.get('id', '?')} (#{i})"
        for key in ("image_id", "category_id"):
            if not isinstance(ann.get(key), int) or isinstance(ann.get(key), bool):
                raise DataError(f"{path}: {label} has no integer '{key}'")
        if "bbox" not in ann:
            raise DataError(f"{path}: {label} has no 'bbox'")
        if not _finite_numbers(ann["bbox"], 4):
            raise DataError(
                f"{path}: {label} has bbox {ann['bbox']!r}; expected 4 finite numbers [x, y, w, h]"
            )


def load_coco(annotations: str | Path) -> COCO:
    """Parse, check and index a COCO instances file (one-line DataError on any problem)."""
    path = Path(annotations)
    if not path.is_file():
        raise DataError(f"annotation file not found: {_where(path)}")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: not a valid COCO instances file ({type(exc).__name__}: {exc})") from exc
    except OSError as exc:
        raise DataError(f"{path}: cannot be read ({exc})") from exc
    _validate(data, path)
    coco = COCO()
    coco.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


class CocoDetection(torch.utils.data.Dataset):
    """Images (uint8) + cleaned targets ``{"boxes" (xyxy float), "labels", "image_id"}``."""

    def __init__(self, images: str | Path, annotations: str | Path, train: bool, flip_prob: float = 0.0):
        self.root = Path(images)
        if not self.root.is_dir():
            raise DataError(f"image folder not found: {_where(self.root)}")
        self.annotations = Path(annotations)
        self.coco = load_coco(annotations)
        self.train = train
        self.flip_prob = flip_prob if train else 0.0
        cat_ids = sorted(self.coco.getCatIds())
        if not cat_ids:
            raise DataError(f"{annotations}: no categories")
        self.cat_to_label = {c: i + 1 for i, c in enumerate(cat_ids)}
        self.label_to_cat = {i + 1: c for i, c in enumerate(cat_ids)}
        self.category_names = {i + 1: self.coco.cats[c].get("name", str(c)) for i, c in enumerate(cat_ids)}
        self.stats = FilterStats()
        self.targets: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.ids: list[int] = []
        for image_id in sorted(self.coco.getImgIds()):
            boxes, labels = self._clean(image_id)
            if train and len(boxes) == 0:
                self.stats.empty_images += 1
                continue
            self.targets[image_id] = (boxes, labels)
            self.ids.append(image_id)
        if not self.ids:
            raise DataError(f"{annotations}: no usable images")
        info = self.coco.imgs
        self.aspect_ratios = [info[i]["width"] / info[i]["height"] for i in self.ids]

    @property
    def num_categories(self) -> int:
        return len(self.cat_to_label)

    def _clean(self, image_id: int) -> tuple[torch.Tensor, torch.Tensor]:
        info = self.coco.imgs[image_id]
        w, h = info["width"], info["height"]
        boxes, labels = [], []
        for ann in self.coco.imgToAnns.get(image_id, []):
            if ann.get("iscrowd", 0):
                self.stats.crowd += 1
                continue
            if ann["category_id"] not in self.cat_to_label:
                self.stats.unknown_category += 1
                continue
            x, y, bw, bh = ann["bbox"]
            x0, y0 = max(0.0, x), max(0.0, y)
            x1, y1 = min(float(w), x + bw), min(float(h), y + bh)
            if x1 - x0 < 1 or y1 - y0 < 1:
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
        info = self.coco.imgs[image_id]
        path = self.root / info["file_name"]
        try:
            with Image.open(path) as img:
                array = np.asarray(img.convert("RGB"))
        except (OSError, ValueError) as exc:
            raise DataError(f"cannot read image {path}: {exc}") from exc
        height, width = array.shape[:2]
        if (width, height) != (info["width"], info["height"]):
            raise DataError(
                f"{path} is {width}x{height} but {self.annotations.name} says {info['width']}x{info['height']}"
            )
        return torch.from_numpy(array.copy()).permute(2, 0, 1).contiguous()

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
