"""Embedded default data: a small, real COCO-format detection dataset drawn on the fly.

``python -m megdet_hpc.data.synthetic --out DIR`` writes ``DIR/{train,val}/*.jpg`` and
``DIR/annotations/instances_{train,val}.json``: filled rectangles, ellipses and triangles of random
colour, size (16-64 px at 128 px images) and position, overlapping, on a noisy gradient background.
Deterministic by seed; no downloads.  Category ids are deliberately not contiguous (1, 3, 7) and the
train split carries a few crowd, degenerate and empty-image cases, so the loader's mapping and
filtering are exercised exactly as with real COCO.
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from megdet_hpc.utils.cli import ArgumentParser, run_cli
from megdet_hpc.utils.errors import UserError

CATEGORIES = [
    {"id": 1, "name": "rectangle", "supercategory": "shape"},
    {"id": 3, "name": "ellipse", "supercategory": "shape"},
    {"id": 7, "name": "triangle", "supercategory": "shape"},
]


def _background(rng: random.Random, size: int) -> Image.Image:
    nprng = np.random.default_rng(rng.randrange(1 << 30))
    c0 = np.array([rng.randrange(256) for _ in range(3)], dtype=np.float32)
    c1 = np.array([rng.randrange(256) for _ in range(3)], dtype=np.float32)
    t = np.linspace(0, 1, size, dtype=np.float32)[None, :, None]
    img = c0 * (1 - t) + c1 * t
    img = np.repeat(img, size, axis=0) + nprng.normal(0, 12, (size, size, 3))
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))


def _draw(rng: random.Random, draw: ImageDraw.ImageDraw, size: int) -> dict:
    cat = rng.choice(CATEGORIES)
    w = rng.randint(size // 8, size // 2)
    h = rng.randint(size // 8, size // 2) if cat["name"] != "triangle" else w
    x0 = rng.randint(0, size - w)
    y0 = rng.randint(0, size - h)
    colour = tuple(rng.randrange(256) for _ in range(3))
    box = [x0, y0, x0 + w, y0 + h]
    if cat["name"] == "rectangle":
        draw.rectangle(box, fill=colour, outline=(0, 0, 0))
    elif cat["name"] == "ellipse":
        draw.ellipse(box, fill=colour, outline=(0, 0, 0))
    else:
        draw.polygon([(x0, y0 + h), (x0 + w, y0 + h), (x0 + w / 2, y0)], fill=colour, outline=(0, 0, 0))
    return {
        "category_id": cat["id"],
        "bbox": [float(x0), float(y0), float(w), float(h)],
        "area": float(w * h),
    }


def make_split(out: Path, split: str, count: int, size: int, seed: int, quirks: bool) -> dict:
    rng = random.Random(f"{seed}-{split}")
    (out / split).mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for i in range(count):
        image_id = i + 1
        img = _background(rng, size)
        draw = ImageDraw.Draw(img)
        empty = quirks and i % 97 == 96
        objects = [] if empty else [_draw(rng, draw, size) for _ in range(rng.randint(1, 4))]
        name = f"{split}_{image_id:06d}.jpg"
        img.save(out / split / name, quality=92)
        images.append({"id": image_id, "file_name": name, "width": size, "height": size})
        for obj in objects:
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "iscrowd": 0, **obj})
        if quirks and i % 50 == 7 and objects:  # a crowd region and a zero-width box to be filtered
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "iscrowd": 1,
                    "category_id": 1,
                    "bbox": [0.0, 0.0, 20.0, 20.0],
                    "area": 400.0,
                }
            )
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "iscrowd": 0,
                    "category_id": 3,
                    "bbox": [5.0, 5.0, 0.0, 9.0],
                    "area": 0.0,
                }
            )
    return {
        "info": {"description": f"megdet_hpc synthetic shapes ({split}, seed {seed})"},
        "images": images,
        "annotations": annotations,
        "categories": CATEGORIES,
    }


def generate(out: Path, train: int = 400, val: int = 100, size: int = 128, seed: int = 0) -> Path:
    """Write the dataset under ``out`` (idempotent for the same arguments); returns ``out``."""
    stamp = out / "annotations" / "synthetic.json"
    spec = {"train": train, "val": val, "size": size, "seed": seed}
    if stamp.is_file() and json.loads(stamp.read_text()) == spec:
        return out
    (out / "annotations").mkdir(parents=True, exist_ok=True)
    for split, count, quirks in (("train", train, True), ("val", val, False)):
        data = make_split(out, split, count, size, seed, quirks)
        tmp = out / "annotations" / f".instances_{split}.json.tmp"
        tmp.write_text(json.dumps(data))
        tmp.replace(out / "annotations" / f"instances_{split}.json")
    stamp.write_text(json.dumps(spec))
    return out


def main(argv: list[str] | None = None) -> int:
    p = ArgumentParser(prog="megdet_hpc.data.synthetic", description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--train", type=int, default=400)
    p.add_argument("--val", type=int, default=100)
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse(argv)

    def _run() -> int:
        if a.train < 1 or a.val < 1 or a.size < 32:
            raise UserError("--train/--val must be >= 1 and --size >= 32")
        generate(a.out, a.train, a.val, a.size, a.seed)
        print(f"wrote {a.train} train + {a.val} val images ({a.size}px) to {a.out}")
        return 0

    return run_cli(_run, "megdet_hpc.data.synthetic")


if __name__ == "__main__":
    sys.exit(main())
