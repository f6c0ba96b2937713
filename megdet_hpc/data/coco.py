"""COCO-format detection datasets through pycocotools, and the loader's input contract.

The input contract (checked before anything is trained; a violation is a one-line ``DataError``
naming the file and the entry, exit code 2; what is cleaned instead is dropped and **counted** by
reason in ``FilterStats``, which the trainer logs):

* the file is a JSON object with ``images``, ``annotations`` and ``categories`` lists of objects;
* every image has an integer ``id`` -- **unique** (pycocotools would keep the last image of a shared
  id, so one file would be trained with another's boxes) --, a non-empty ``file_name`` and positive
  integer ``width`` and ``height``, which must be the decoded file's size;
* every category has an integer ``id``, unique;
* every annotation has an integer ``id`` (unique: pycocotools indexes them by it, and evaluation reads
  them back by it), integer ``image_id`` and ``category_id``, and a ``bbox`` of 4 finite numbers
  ``[x, y, w, h]`` (a ``NaN`` would otherwise become a full-width box);
* dropped and counted: annotations whose ``image_id`` is no image of the file ("no such image"),
  crowd regions, boxes that are empty once clipped to the image (zero or negative width or height,
  entirely outside it), unknown ``category_id``; images left without boxes are skipped for training
  (kept for evaluation).

Image files: every format Pillow opens; a multi-frame file (animated GIF, multi-page TIFF) is read
at its first frame.  Pixel modes: the 8-bit ones (``1``, ``L``, ``LA``, ``P``, ``PA``, ``RGB``,
``RGBA``, ``CMYK``, ``YCbCr``, ...) are converted to RGB (alpha dropped); 16-bit grayscale
(``I;16``, ``I;16B``, ``I;16L``: 16-bit PNG and TIFF) is scaled to 8 bits over its full range
(``round(v / 257)``) -- a plain ``convert("RGB")`` would clip it to pure white; 16-bit RGB PNGs are
reduced to 8 bits by Pillow itself.  32-bit integer (``I``) and float (``F``) pixels have no range
the loader can know and are refused with a ``DataError`` naming the file.

COCO category ids are mapped to contiguous labels 1..K (0 is background) and back for evaluation.
Images are returned as uint8 CHW tensors (4x fewer bytes to pin and copy than float32); the model
input is ``to_float(image)`` on the device.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from megdet_hpc.data.annotations import DataError, check_dataset_files, load_coco

__all__ = ["CocoDetection", "DataError", "FilterStats", "load_coco", "to_float", "to_rgb8"]


@dataclass
class FilterStats:
    kept_boxes: int = 0
    crowd: int = 0
    degenerate: int = 0  # zero width or height once clipped to the image (or entirely outside it)
    unknown_category: int = 0
    no_image: int = 0  # annotations whose image_id is no image of the file
    empty_images: int = 0  # training images left without boxes (skipped)
    per_image: dict[int, int] = field(default_factory=dict)

    def summary(self) -> str:
        dropped = {
            "crowd": self.crowd,
            "degenerate": self.degenerate,
            "unknown category": self.unknown_category,
            "no such image": self.no_image,
        }
        parts = [f"{count} {reason}" for reason, count in dropped.items() if count]
        text = f"{self.kept_boxes} boxes kept; dropped {', '.join(parts) if parts else 'none'}"
        if self.empty_images:
            text += f"; {self.empty_images} image(s) without boxes skipped"
        return text


SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N")


def to_rgb8(img: Image.Image, path: Path) -> np.ndarray:
    """HxWx3 uint8 pixels of an opened image (its first frame), as the module's contract says:
    8-bit modes converted, 16-bit grayscale scaled over its full range, 32-bit int/float refused."""
    if img.mode in SIXTEEN_BIT_MODES:
        wide = np.asarray(img).astype(np.uint32)
        gray = ((wide * 255 + 32767) // 65535).astype(np.uint8)
        return np.repeat(gray[:, :, None], 3, axis=2)
    if img.mode in ("I", "F"):
        kind = "32-bit integer" if img.mode == "I" else "32-bit float"
        raise DataError(
            f"cannot read image {path}: {kind} pixels (mode {img.mode}) have no known range; "
            "convert it to 8- or 16-bit"
        )
    return np.asarray(img.convert("RGB"))


def to_float(image: torch.Tensor) -> torch.Tensor:
    """uint8 CHW image -> float in [0, 1] (the detector's input)."""
    return image.float().div_(255.0) if image.dtype == torch.uint8 else image


class CocoDetection(torch.utils.data.Dataset):
    """Images (uint8) + cleaned targets ``{"boxes" (xyxy float), "labels", "image_id"}``."""

    def __init__(self, images: str | Path, annotations: str | Path, train: bool, flip_prob: float = 0.0):
        self.root = Path(images)
        self.annotations = Path(annotations)
        self.coco = check_dataset_files(images, annotations)
        self.train = train
        self.flip_prob = flip_prob if train else 0.0
        cat_ids = sorted(self.coco.getCatIds())
        if not cat_ids:
            raise DataError(f"{annotations}: no categories")
        self.cat_to_label = {c: i + 1 for i, c in enumerate(cat_ids)}
        self.label_to_cat = {i + 1: c for i, c in enumerate(cat_ids)}
        self.category_names = {i + 1: self.coco.cats[c].get("name", str(c)) for i, c in enumerate(cat_ids)}
        self.stats = FilterStats()
        self.stats.no_image = sum(
            len(anns) for image_id, anns in self.coco.imgToAnns.items() if image_id not in self.coco.imgs
        )
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
                array = to_rgb8(img, path)
        except (OSError, ValueError) as exc:
            if isinstance(exc, DataError):
                raise
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
