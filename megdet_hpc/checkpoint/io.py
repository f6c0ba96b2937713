"""Crash-safe checkpoint files: atomic write, manifest with checksum, verified safe load.

A checkpoint ``model_0001234.pth`` is written to a temporary file in the same directory, flushed and
fsync'ed, renamed into place, then its manifest ``model_0001234.json`` (size + sha256) is written the
same way, and only then is the ``last_checkpoint`` pointer replaced atomically.  A writer killed at any
point leaves the previous checkpoint and pointer intact; a truncated or corrupted file fails its
checksum and the loader falls back to the previous one.  Files are read with
``torch.load(weights_only=True)``: a checkpoint cannot run code.  A checkpoint copied without its
manifest (how runs are forked) is still a checkpoint: it is used if it loads.

Temporary names carry the writer's host and pid (``.model_0001234.pth.tmp-host-pid``) so that a
leftover can be told from a live writer's file.  Write errors are reported in the OS's words with the
path ("no space left on device"): ``torch.save`` itself would only say "unexpected pos".
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import re
import socket
from pathlib import Path
from typing import Any

import torch

from megdet_hpc.utils.errors import UserError

POINTER = "last_checkpoint"
NAME_RE = re.compile(r"^model_(\d{7,})\.pth$")
MANIFEST_RE = re.compile(r"^model_(\d{7,})\.json$")

log = logging.getLogger("megdet_hpc.checkpoint")


class CheckpointError(UserError, RuntimeError):
    """A checkpoint that cannot be used, with a one-line reason."""


def checkpoint_name(iteration: int) -> str:
    return f"model_{iteration:07d}.pth"


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


TMP_RE = re.compile(r"^\..+\.tmp-(?P<host>.+)-(?P<pid>\d+)$")


def _temp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{socket.gethostname()}-{os.getpid()}")


class _RecordingFile:
    """A file object that remembers the first OSError of a write (torch.save hides it)."""

    def __init__(self, fh: Any) -> None:
        self.fh = fh
        self.error: OSError | None = None

    def write(self, data: Any) -> int:
        try:
            return self.fh.write(data)
        except OSError as exc:
            self.error = self.error or exc
            raise

    def flush(self) -> None:
        self.fh.flush()


def _os_message(exc: OSError, path: Path) -> str:
    if exc.errno == errno.ENOSPC:
        return f"no space left on device writing {path}"
    return f"cannot write {path}: {exc.strerror or exc}"


def _atomic_write_bytes(path: Path, write: Any) -> None:
    tmp = _temp_name(path)
    try:
        with open(tmp, "wb") as raw:
            fh = _RecordingFile(raw)
            try:
                write(fh)
                fh.flush()
                os.fsync(raw.fileno())
            except OSError as exc:
                raise CheckpointError(_os_message(exc, path)) from exc
            except Exception as exc:
                if fh.error is not None:
                    raise CheckpointError(_os_message(fh.error, path)) from exc
                raise
        os.replace(tmp, path)
    except OSError as exc:
        raise CheckpointError(_os_message(exc, path)) from exc
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


def read_manifest(manifest_path: Path) -> dict[str, Any]:
    """A manifest's JSON object, or a one-line CheckpointError (not JSON, not UTF-8, not an object)."""
    try:
        manifest = json.loads(manifest_path.read_bytes().decode("utf-8"))
    except OSError as exc:
        raise CheckpointError(f"{manifest_path.name}: unreadable manifest ({exc.strerror or exc})") from exc
    except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError
        reason = "not UTF-8 text" if isinstance(exc, UnicodeDecodeError) else f"not valid JSON: {exc}"
        raise CheckpointError(f"{manifest_path.name}: unreadable manifest ({reason})") from exc
    if not isinstance(manifest, dict):
        raise CheckpointError(
            f"{manifest_path.name}: unreadable manifest (a JSON {type(manifest).__name__}, not an object)"
        )
    return manifest


def verify(path: Path) -> dict[str, Any]:
    """Check the manifest's size and checksum; returns the manifest or raises CheckpointError.

    Without a manifest the file must load (``weights_only``) as a megdet_hpc checkpoint.
    """
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint")
    manifest_path = path.with_suffix(".json")
    if not manifest_path.is_file():
        state = load_file(path, check=False)
        return {"file": path.name, "iteration": state.get("iteration"), "manifest": False}
    manifest = read_manifest(manifest_path)
    size = path.stat().st_size
    if size != manifest.get("size"):
        raise CheckpointError(f"{path.name}: {size} bytes, manifest says {manifest.get('size')} (truncated?)")
    if sha256_of(path) != manifest.get("sha256"):
        raise CheckpointError(f"{path.name}: checksum mismatch (corrupted)")
    return manifest


# What a file that is not a PyTorch file most likely is, by its first bytes (for the message only).
MAGIC = {
    b"\xff\xd8\xff": "a JPEG image",
    b"\x89PNG": "a PNG image",
    b"GIF8": "a GIF image",
    b"%PDF": "a PDF document",
    b"\x1f\x8b": "a gzip archive",
    b"\x93NUMPY": "a NumPy .npy array",
    b"\x89HDF": "an HDF5 file",
}
ZIP_MAGIC = b"PK\x03\x04"  # torch.save's format since 1.6
PICKLE_MAGIC = b"\x80"  # a pickle of protocol 2+ (torch.save's legacy format starts with one)


def not_a_torch_file(path: Path) -> str | None:
    """Why ``path`` cannot be a file written by ``torch.save`` (None when it may be one): so a JPEG
    renamed ``.pth`` is called a JPEG, not blamed on objects that could run code."""
    with open(path, "rb") as fh:
        head = fh.read(8)
    if not head:
        return "an empty file (0 bytes)"
    if head.startswith((ZIP_MAGIC, PICKLE_MAGIC)):
        return None
    for magic, kind in MAGIC.items():
        if head.startswith(magic):
            return kind
    try:
        head.decode("ascii")
        return "a text file"
    except UnicodeDecodeError:
        return f"unrecognised content (first bytes {head[:4].hex(' ')})"


def safe_load(path: Path) -> Any:
    """``torch.load(weights_only=True)`` with a one-line reason when it fails (torch's own message
    recommends turning the protection off; ours does not)."""
    if path.is_dir():
        raise CheckpointError(f"{path}: cannot be loaded: it is a directory")
    try:
        kind = not_a_torch_file(path)
    except FileNotFoundError as exc:
        raise CheckpointError(f"{path}: cannot be loaded: no such file") from exc
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot be loaded: {exc.strerror or exc}") from exc
    if kind is not None:
        raise CheckpointError(f"{path.name}: cannot be loaded: not a PyTorch file ({kind})")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError as exc:
        raise CheckpointError(f"{path}: cannot be loaded: no such file") from exc
    except Exception as exc:
        text = str(exc).strip()
        if "Weights only load failed" in text:
            reason = (
                "it holds objects other than tensors and plain data (refused: loading them could run code)"
            )
        else:
            first = text.splitlines()[0][:120] if text else ""
            reason = f"not a readable PyTorch file ({type(exc).__name__}: {first})"
        raise CheckpointError(f"{path.name}: cannot be loaded: {reason}") from exc


def load_file(path: Path, check: bool = True) -> dict[str, Any]:
    """Load a checkpoint safely (weights_only); verify its manifest first when it has one."""
    if check and path.with_suffix(".json").exists():
        verify(path)
    state = safe_load(path)
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
    named = pointed_to(folder)
    if named is not None and named in found:
        found.remove(named)
        found.insert(0, named)
    elif named is not None and found:
        log.warning(
            "%s names %s, which is not a checkpoint in %s; ignoring it, trying the newest one",
            POINTER,
            named.name,
            folder,
        )
    return found


def pointed_to(folder: Path) -> Path | None:
    """The file the ``last_checkpoint`` pointer names, or None (no pointer, or an unreadable one:
    said in a warning, the checkpoints are then tried newest first)."""
    pointer = folder / POINTER
    if not pointer.is_file():
        return None
    try:
        text = pointer.read_bytes().decode("utf-8").strip()
    except OSError as exc:
        log.warning("%s cannot be read (%s); ignoring it", pointer, exc.strerror or exc)
        return None
    except UnicodeDecodeError:
        log.warning("%s is not UTF-8 text (corrupted?); ignoring it, trying the newest checkpoint", pointer)
        return None
    if not NAME_RE.match(text):
        log.warning(
            "%s holds %r, not a checkpoint name (corrupted?); ignoring it, trying the newest checkpoint",
            pointer,
            text[:60],
        )
        return None
    return folder / text


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temporaries(folder: Path) -> int:
    """Temp files of writers that were killed mid-save (never loaded, safe to delete).

    Call only while holding the directory's lock: then no other training writes here.  A temp file of a
    process that is still alive on this host (an evaluation, a tool) is left alone all the same.
    """
    count = 0
    here = socket.gethostname()
    if folder.is_dir():
        for p in folder.glob(".*.tmp-*"):
            match = TMP_RE.match(p.name)
            if (
                match
                and match["host"] == here
                and _alive(int(match["pid"]))
                and int(match["pid"]) != os.getpid()
            ):
                continue
            p.unlink(missing_ok=True)
            count += 1
    return count
