"""The COCO loader's input contract (``megdet_hpc/data/coco.py``), tried as a hostile user would.

Each case runs the real CLI on a copy of the tiny dataset with one thing broken and asserts the exit
code, the one-line message (no traceback) and that nothing was written; cleaned inputs must be
counted in the log.  Image decoding is also checked on the decoded pixels (a 16-bit PNG used to come
out pure white without a word).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_faults import HANG_GUARD, copy_data, one_line_error, train

ANNOTATIONS = "annotations/instances_train.json"


def _edit(data: Path, change) -> None:  # type: ignore[no-untyped-def]
    path = data / ANNOTATIONS
    content = json.loads(path.read_text())
    change(content)
    path.write_text(json.dumps(content))


def _config(tiny_config, data: Path, **train_section):  # type: ignore[no-untyped-def]
    return tiny_config(
        data={"train_images": str(data / "train"), "train_annotations": str(data / ANNOTATIONS)},
        solver={"max_iter": 1},
        train={"eval_at_end": False, **train_section},
    )


def _duplicate_image_id(d: dict) -> None:
    d["images"][1]["id"] = d["images"][0]["id"]


def _duplicate_annotation_id(d: dict) -> None:
    d["annotations"][1]["id"] = d["annotations"][0]["id"]


REFUSED = {
    "duplicate image id": (
        _duplicate_image_id,
        "image id 1 is used by both 'train_000001.jpg' and 'train_000002.jpg'",
    ),
    "duplicate annotation id": (_duplicate_annotation_id, "appears twice (ids must be unique)"),
    "duplicate category id": (
        lambda d: d["categories"].append(dict(d["categories"][0])),
        "category id 1 appears twice",
    ),
    "annotation without id": (lambda d: d["annotations"][0].pop("id"), "has no integer 'id'"),
    "images not a list": (lambda d: d.update(images={"0": d["images"][0]}), "no 'images' list"),
    "image entry not an object": (lambda d: d["images"].insert(0, 5), "image #0 is not an object"),
    "bbox of 5 numbers": (
        lambda d: d["annotations"][0].update(bbox=[1, 2, 3, 4, 5]),
        "expected 4 finite numbers",
    ),
    "bbox as a string": (lambda d: d["annotations"][0].update(bbox="1,2,3,4"), "expected 4 finite numbers"),
    "negative image size": (lambda d: d["images"][0].update(width=-64), "has size -64x64"),
    "category id as a string": (
        lambda d: d["annotations"][0].update(category_id="1"),
        "has no integer 'category_id'",
    ),
}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_broken_annotation_files_are_refused_in_one_line(
    tiny_config, tiny_data: Path, tmp_path: Path, case: str
) -> None:
    change, message = REFUSED[case]
    data = copy_data(tiny_data, tmp_path)
    _edit(data, change)
    proc, elapsed = train(_config(tiny_config, data))
    assert proc.returncode == 2 and elapsed < HANG_GUARD, proc.stderr[-2000:]
    line = one_line_error(proc)
    assert message in line and ANNOTATIONS.split("/")[1] in line, line
    assert not (tmp_path / "out").exists()  # refused before anything was written


def test_cleaned_annotations_are_counted(tiny_config, tiny_data: Path, tmp_path: Path) -> None:
    """Dropped, never silently: an annotation of no image, a negative-size box, an unknown category."""

    def change(d: dict) -> None:
        d["annotations"].append({**d["annotations"][0], "id": 10_000, "image_id": 987_654})
        d["annotations"][1]["bbox"] = [10, 10, -5, 8]
        d["annotations"][2]["category_id"] = 99

    from megdet_hpc.data.coco import CocoDetection

    before = CocoDetection(tiny_data / "train", tiny_data / ANNOTATIONS, train=True).stats
    data = copy_data(tiny_data, tmp_path)
    _edit(data, change)
    proc, _ = train(_config(tiny_config, data))
    assert proc.returncode == 0, proc.stderr[-2000:]
    (line,) = [x for x in proc.stdout.splitlines() if "training data:" in x]
    assert before.unknown_category == before.no_image == 0
    assert f"{before.degenerate + 1} degenerate" in line, line
    assert "1 unknown category" in line and "1 no such image" in line, line


# -- image modes --------------------------------------------------------------------------------------------
def _rewrite_images(data: Path, save) -> None:  # type: ignore[no-untyped-def]
    """Replace every training JPEG by ``save(rgb_array, stem) -> new file name``; update the JSON."""
    names = {}
    for jpg in sorted((data / "train").glob("*.jpg")):
        rgb = np.asarray(Image.open(jpg).convert("RGB"))
        names[jpg.name] = save(rgb, data / "train" / jpg.stem)
        jpg.unlink()
    _edit(data, lambda d: [img.update(file_name=names[img["file_name"]]) for img in d["images"]])


def _gray16(rgb: np.ndarray, stem: Path) -> str:
    gray = np.asarray(Image.fromarray(rgb).convert("L")).astype(np.uint16) * 257
    Image.fromarray(gray).save(stem.with_suffix(".png"))  # mode I;16
    return stem.with_suffix(".png").name


def test_a_16_bit_png_is_scaled_not_clipped_to_white(tiny_data: Path, tmp_path: Path) -> None:
    from megdet_hpc.data.coco import CocoDetection

    data = copy_data(tiny_data, tmp_path)
    first = sorted((data / "train").glob("*.jpg"))[0]
    eight_bit = np.asarray(Image.open(first).convert("L"))
    _rewrite_images(data, _gray16)
    assert Image.open(data / "train" / f"{first.stem}.png").mode == "I;16"
    ds = CocoDetection(data / "train", data / ANNOTATIONS, train=True)
    image_id = next(i for i in ds.ids if ds.coco.imgs[i]["file_name"] == f"{first.stem}.png")
    pixels = ds.load_image(image_id)
    assert pixels.dtype == torch.uint8 and pixels.shape[0] == 3
    assert (pixels[0].numpy() == eight_bit).all()  # the same picture, not 255 everywhere


def _mixed_modes(rgb: np.ndarray, stem: Path) -> str:
    """16-bit gray, palette, gray + alpha and a 2-frame GIF, in turn."""
    kind = int(stem.name.split("_")[-1]) % 4
    img = Image.fromarray(rgb)
    if kind == 0:
        return _gray16(rgb, stem)
    if kind == 1:
        img.convert("P").save(stem.with_suffix(".png"))
        return stem.with_suffix(".png").name
    if kind == 2:
        img.convert("LA").save(stem.with_suffix(".png"))
        return stem.with_suffix(".png").name
    frames = [img.convert("P"), Image.new("P", img.size, 3)]
    frames[0].save(stem.with_suffix(".gif"), save_all=True, append_images=frames[1:])
    return stem.with_suffix(".gif").name


def test_other_image_modes_train(tiny_config, tiny_data: Path, tmp_path: Path) -> None:
    data = copy_data(tiny_data, tmp_path)
    _rewrite_images(data, _mixed_modes)
    proc, _ = train(_config(tiny_config, data), "solver.max_iter=3", "data.num_workers=1")
    assert proc.returncode == 0, proc.stderr[-2000:]


@pytest.mark.parametrize("mode", ["F", "I"])
def test_32_bit_pixels_are_refused_naming_the_file(
    tiny_config, tiny_data: Path, tmp_path: Path, mode: str
) -> None:
    def save(rgb: np.ndarray, stem: Path) -> str:
        gray = np.asarray(Image.fromarray(rgb).convert("L"))
        values = gray.astype(np.float32) / 255 if mode == "F" else gray.astype(np.int32) * 1000
        Image.fromarray(values).save(stem.with_suffix(".tif"))
        return stem.with_suffix(".tif").name

    data = copy_data(tiny_data, tmp_path)
    _rewrite_images(data, save)
    proc, _ = train(_config(tiny_config, data))
    assert proc.returncode == 2, proc.stderr[-2000:]
    line = one_line_error(proc)
    assert (
        f"cannot read image {data / 'train'}/train_" in line and f"(mode {mode}) have no known range" in line
    )
