"""Crash-safe checkpoint files: atomic write, manifest with checksum, verified safe load.

A checkpoint ``model_0001234.pth`` is written to a temporary file in the same directory, flushed and
fsync'ed, renamed into place, then its manifest ``model_0001234.json`` (size + sha256) is written the
same way, and only then is the ``last_checkpoint`` pointer replaced atomically.  A writer killed at any
point leaves the previous checkpoint and pointer intact; a truncated or corrupted file fails its
checksum and the loader falls back to the previous one.  Files are read with
``torch.load(weights_only=True)``: a checkpoint cannot run code.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any

import torch

POINTER = "last_checkpoint"
NAME_RE = re.compile(r"^model_(\d{7,})\.pth$")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used, with a one-line reason."""


def checkpoint_name(iteration: int) -> str:
    return f"model_{iteration:07d}.pth"


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _atomic_write_bytes(path: Path, write: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    _fsync_dir(path.parent)


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def write_checkpoint(folder: Path, iteration: int, state: dict[str, Any], meta: dict[str, Any]) -> Path:
    """Write ``state`` as checkpoint ``iteration`` + manifest, then move the pointer to it."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / checkpoint_name(iteration)
    _atomic_write_bytes(path, lambda fh: torch.save(state, fh))
    manifest = {"file": path.name, "size": path.stat().st_size, "sha256": sha256_of(path), **meta}
    _atomic_write_bytes(path.with_suffix(".json"), lambda fh: fh.write(json.dumps(manifest).encode()))
    _atomic_write_bytes(folder / POINTER, lambda fh: fh.write(path.name.encode() + b"\n"))
    return path


def verify(path: Path) -> dict[str, Any]:
    """Check the manifest's size and checksum; returns the manifest or raises CheckpointError."""
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint")
    manifest_path = path.with_suffix(".json")
    if not manifest_path.is_file():
        raise CheckpointError(f"{path.name}: manifest {manifest_path.name} missing (incomplete save?)")
    try:
        manifest = json.loads(manifest_path.read_text())
    except (json.JSONDecodeError, OSError) as exc:
        raise CheckpointError(f"{manifest_path.name}: unreadable manifest ({exc})") from exc
    size = path.stat().st_size
    if size != manifest.get("size"):
        raise CheckpointError(f"{path.name}: {size} bytes, manifest says {manifest.get('size')} (truncated?)")
    if sha256_of(path) != manifest.get("sha256"):
        raise CheckpointError(f"{path.name}: checksum mismatch (corrupted)")
    return manifest


def load_file(path: Path, check: bool = True) -> dict[str, Any]:
    """Load a checkpoint safely (weights_only); verify its manifest first when it has one."""
    if check and path.with_suffix(".json").exists():
        verify(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise CheckpointError(f"{path.name}: cannot be loaded ({type(exc).__name__}: {first[:200]})") from exc
    if not isinstance(state, dict) or "model" not in state:
        raise CheckpointError(f"{path.name}: not a megdet_hpc checkpoint (no 'model' entry)")
    return state


def candidates(folder: Path) -> list[Path]:
    """Checkpoints in ``folder``, the pointer's first, then newest to oldest."""
    if not folder.is_dir():
        return []
    found = sorted(
        (p for p in folder.iterdir() if NAME_RE.match(p.name)),
        key=lambda p: int(NAME_RE.match(p.name).group(1)),  # type: ignore[union-attr]
        reverse=True,
    )
    pointer = folder / POINTER
    if pointer.is_file():
        named = folder / pointer.read_text().strip()
        if named in found:
            found.remove(named)
            found.insert(0, named)
    return found


def remove_stale_temporaries(folder: Path) -> int:
    """Temp files of writers that were killed mid-save (never loaded, safe to delete)."""
    count = 0
    if folder.is_dir():
        for p in folder.glob(".*.tmp-*"):
            p.unlink(missing_ok=True)
            count += 1
    return count
