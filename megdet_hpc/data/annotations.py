"""Parsing and checking COCO instances files, without torch.

The structural half of the input contract described in ``megdet_hpc.data.coco`` lives here so that
``python -m megdet_hpc.train`` can refuse a broken annotation file before it imports torch and
torchvision (several seconds of CPU on every rank, for a one-line error).  The early check hands its
parse to the dataset built after it (``keep``), so a file is read once (COCO train2017: ~20 s).
"""

from __future__ import annotations

import contextlib
import io
import json
import math
from pathlib import Path
from typing import Any

from pycocotools.coco import COCO

from megdet_hpc.utils.errors import UserError

__all__ = ["DataError", "check_dataset_files", "load_coco", "where"]


class DataError(UserError, ValueError):
    """Missing or malformed dataset files, with a one-line message."""


def where(path: Path) -> str:
    """``path``, and for a relative one the directory it was looked up from (jobs run elsewhere)."""
    return str(path) if path.is_absolute() else f"{path} (relative to {Path.cwd()})"


def _finite_numbers(values: Any, length: int) -> bool:
    return (
        isinstance(values, list)
        and len(values) == length
        and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in values)
    )


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _validate(data: Any, path: Path) -> None:
    """One-line DataError for the first structural problem of a COCO instances file."""
    if not isinstance(data, dict):
        raise DataError(f"{path}: not a COCO instances file (top level is a {type(data).__name__})")
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            raise DataError(f"{path}: no '{key}' list")
    category_ids: set[int] = set()
    for i, cat in enumerate(data["categories"]):
        if not isinstance(cat, dict) or not _is_int(cat.get("id")):
            raise DataError(f"{path}: category #{i} has no integer 'id'")
        if cat["id"] in category_ids:
            raise DataError(f"{path}: category id {cat['id']} appears twice (ids must be unique)")
        category_ids.add(cat["id"])
    files_of: dict[int, str] = {}
    for i, img in enumerate(data["images"]):
        if not isinstance(img, dict):
            raise DataError(f"{path}: image #{i} is not an object")
        for key in ("id", "width", "height"):
            if not _is_int(img.get(key)):
                raise DataError(f"{path}: image #{i} (id {img.get('id')}) has no integer '{key}'")
        if img["width"] <= 0 or img["height"] <= 0:
            raise DataError(f"{path}: image id {img['id']} has size {img['width']}x{img['height']}")
        if not isinstance(img.get("file_name"), str) or not img["file_name"]:
            raise DataError(f"{path}: image id {img['id']} has no 'file_name'")
        if img["id"] in files_of:
            raise DataError(
                f"{path}: image id {img['id']} is used by both {files_of[img['id']]!r} and "
                f"{img['file_name']!r} (image ids must be unique)"
            )
        files_of[img["id"]] = img["file_name"]
    annotation_ids: set[int] = set()
    for i, ann in enumerate(data["annotations"]):
        if not isinstance(ann, dict):
            raise DataError(f"{path}: annotation #{i} is not an object")
        label = f"annotation id {ann.get('id', '?')} (#{i})"
        for key in ("id", "image_id", "category_id"):
            if not _is_int(ann.get(key)):
                raise DataError(f"{path}: {label} has no integer '{key}'")
        if ann["id"] in annotation_ids:
            raise DataError(f"{path}: annotation id {ann['id']} appears twice (ids must be unique)")
        annotation_ids.add(ann["id"])
        if "bbox" not in ann:
            raise DataError(f"{path}: {label} has no 'bbox'")
        if not _finite_numbers(ann["bbox"], 4):
            raise DataError(
                f"{path}: {label} has bbox {ann['bbox']!r}; expected 4 finite numbers [x, y, w, h]"
            )


# Parses handed from the pre-torch check to the dataset: resolved path -> ((mtime_ns, size), parse).
_kept: dict[Path, tuple[tuple[int, int], COCO]] = {}


def load_coco(annotations: str | Path, *, keep: bool = False) -> COCO:
    """Parse, check and index a COCO instances file (one-line DataError on any problem).

    ``keep``: hold this parse for the next ``load_coco`` of the same file, which takes it if the file
    is unchanged on disk (same modification time and size) and parses again otherwise.  Taken once,
    so nothing outlives the dataset that uses it and a later load always reads the file."""
    path = Path(annotations)
    if not path.is_file():
        raise DataError(f"annotation file not found: {where(path)}")
    try:
        stat = path.stat()
    except OSError as exc:
        raise DataError(f"{path}: cannot be read ({exc})") from exc
    key, state = path.resolve(), (stat.st_mtime_ns, stat.st_size)
    kept = _kept.pop(key, None)
    coco = kept[1] if kept is not None and kept[0] == state else _parse(path)
    if keep:
        _kept[key] = (state, coco)
    return coco


def _parse(path: Path) -> COCO:
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


def check_dataset_files(images: str | Path, annotations: str | Path, *, keep: bool = False) -> COCO:
    """The image folder exists and the annotation file is a valid COCO instances file (its parse;
    ``keep`` as for ``load_coco``)."""
    root = Path(images)
    if not root.is_dir():
        raise DataError(f"image folder not found: {where(root)}")
    return load_coco(annotations, keep=keep)
