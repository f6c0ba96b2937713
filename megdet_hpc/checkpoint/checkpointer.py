"""Periodic, optionally background, checkpointing and resume with fallback, for one output directory.

Rank 0 is the only writer, and ``open`` makes it the only writer of the directory across jobs too (an
OS lock, ``checkpoint/lock.py``), then removes temporaries of dead writers.  Background mode snapshots
the state to CPU on the training thread (the only stall) and writes on a worker thread; at most one
save is in flight and a failed one is reported at the next step (``raise_if_failed``), naming the
save's iteration and the OS error.

Resume picks the newest *usable* checkpoint (pointer first): rank 0 verifies checksums (or, for a file
copied without its manifest, that it loads) and falls back past corrupt or truncated files with a
warning.  When checkpoint files exist but none can be used, that is an error naming them -- training
from scratch over them would silently discard (and later overwrite) the run.  Every rank then reads
the same file.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import Any

import torch

from megdet_hpc.checkpoint.io import (
    MANIFEST_RE,
    NAME_RE,
    CheckpointError,
    candidates,
    load_file,
    remove_stale_temporaries,
    verify,
    write_checkpoint,
)
from megdet_hpc.checkpoint.lock import LOCK_NAME, OutputDirLock
from megdet_hpc.distributed import Comm

log = logging.getLogger("megdet_hpc.checkpoint")
ARCHIVE = "archive"


def snapshot(obj: Any) -> Any:
    """Deep copy with every tensor cloned to CPU, so training can go on while a thread writes."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: snapshot(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(snapshot(v) for v in obj)
    return obj


def collective_check(comm: Comm, action: Any) -> Any:
    """Run ``action`` on rank 0; its ``UserError``/``OSError`` becomes a ``CheckpointError`` on every
    rank (a rank-0-only failure must not leave the others waiting in the next collective)."""
    result: Any = None
    error: str | None = None
    if comm.is_main:
        try:
            result = action()
        except CheckpointError as exc:
            error = str(exc)
        except OSError as exc:
            error = f"{getattr(exc, 'filename', '') or ''}: {exc.strerror or exc}".lstrip(": ")
    result, error = comm.broadcast_object((result, error), root=0)
    if error:
        raise CheckpointError(error)
    return result


class Checkpointer:
    def __init__(self, folder: Path, comm: Comm, keep: int = 3, background: bool = True) -> None:
        self.folder = Path(folder)
        self.comm = comm
        self.keep = keep
        self.background = background
        self.lock = OutputDirLock(self.folder)
        self._thread: threading.Thread | None = None
        self._error: tuple[int, BaseException] | None = None
        self.last_saved_iteration: int | None = None
        self.last_stall_s = 0.0
        self.last_write_s = 0.0

    # -- the directory ---------------------------------------------------------------------------
    def open(self) -> None:
        """Collective.  Create the directory, check it is writable, take its lock (one writer),
        remove temporaries of dead writers."""
        collective_check(self.comm, self._open)

    def _open(self) -> None:
        if self.folder.exists() and not self.folder.is_dir():
            raise CheckpointError(f"train.output_dir {self.folder} exists and is not a directory")
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            self.lock.acquire()
        except PermissionError as exc:
            raise CheckpointError(f"train.output_dir {self.folder} is not writable ({exc.strerror})") from exc
        except OSError as exc:
            raise CheckpointError(f"train.output_dir {self.folder}: {exc.strerror or exc}") from exc
        stale = remove_stale_temporaries(self.folder)
        if stale:
            log.warning("removed %d temporary file(s) of an interrupted checkpoint save", stale)
        orphans = self._remove_orphan_manifests()
        if orphans:
            log.warning("removed %d manifest(s) whose checkpoint is gone (an interrupted pruning)", orphans)

    def _remove_orphan_manifests(self) -> int:
        """Manifests without their ``.pth``: what a writer killed between the two deletes of a pruning
        leaves (the ``.pth`` goes first, so a half-pruned checkpoint is never a manifest-less ``.pth``
        that looks like a user's copy).  Called while holding the lock."""
        count = 0
        for p in self.folder.iterdir():
            if MANIFEST_RE.match(p.name) and not p.with_suffix(".pth").exists():
                p.unlink(missing_ok=True)
                count += 1
        return count

    def close(self) -> None:
        self.wait()
        self.lock.release()

    def archive_previous_run(self) -> Path | None:
        """Collective.  ``--no-resume``: move *everything* an earlier run left here (checkpoints,
        pointer, metrics, logs, TensorBoard, evaluations, plots) into ``archive/<time>/``, so a fresh
        start neither resumes from nor appends to nor overwrites any of it."""
        return collective_check(self.comm, self._archive)

    def _archive(self) -> Path | None:
        names = [p for p in self.folder.iterdir() if p.name not in (ARCHIVE, LOCK_NAME)]
        if not names:
            return None
        moved = self.folder / ARCHIVE / time.strftime("%Y%m%d-%H%M%S")
        suffix = 1
        while moved.exists():
            moved = moved.with_name(f"{moved.name.split('.')[0]}.{suffix}")
            suffix += 1
        moved.mkdir(parents=True)
        for p in names:
            p.rename(moved / p.name)
        return moved

    # -- saving -----------------------------------------------------------------------------------
    def save(self, iteration: int, state: dict[str, Any], meta: dict[str, Any], block: bool = False) -> None:
        """Collective: call on every rank.  ``state`` must already hold the gathered RNG states."""
        self.last_saved_iteration = iteration
        if not self.comm.is_main:
            return
        start = time.perf_counter()
        self.wait()
        frozen = snapshot(state) if (self.background and not block) else state
        self.last_stall_s = time.perf_counter() - start
        if self.background and not block:
            self._thread = threading.Thread(target=self._write, args=(iteration, frozen, meta), daemon=True)
            self._thread.start()
        else:
            self._write(iteration, frozen, meta)
            self.wait()
            self.last_stall_s = time.perf_counter() - start

    def _write(self, iteration: int, state: dict[str, Any], meta: dict[str, Any]) -> None:
        start = time.perf_counter()
        try:
            path = write_checkpoint(self.folder, iteration, state, meta)
            self._prune(keep_name=path.name)
        except BaseException as exc:  # re-raised on the training thread by wait()/raise_if_failed()
            self._error = (iteration, exc)
        self.last_write_s = time.perf_counter() - start

    def raise_if_failed(self) -> None:
        """Report a background save that already failed (cheap: no waiting)."""
        if self._error is not None and (self._thread is None or not self._thread.is_alive()):
            self.wait()

    def finish_writing(self, timeout_s: float) -> None:
        """Give a background save in flight up to ``timeout_s`` to complete (the stall watchdog calls
        this before ending the process; a save it cuts short leaves only a temporary)."""
        thread = self._thread
        if thread is not None:
            thread.join(timeout_s)

    def wait(self) -> None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            (iteration, err), self._error = self._error, None
            raise CheckpointError(f"checkpoint save at iteration {iteration} failed: {err}") from err

    def _prune(self, keep_name: str) -> None:
        """Keep the newest ``keep`` checkpoints *this code wrote* (those with a manifest).  A ``.pth``
        without a manifest (a user's copy from another run) neither counts nor is ever deleted: it
        would otherwise take the place of a verified checkpoint.  Order of the deletes: ``.pth``, then
        its manifest; a kill between them leaves a manifest without its file, removed at the next
        ``open``."""
        found = sorted(
            (p for p in self.folder.iterdir() if NAME_RE.match(p.name) and p.with_suffix(".json").exists()),
            key=lambda p: int(NAME_RE.match(p.name).group(1)),  # type: ignore[union-attr]
        )
        for old in found[: max(0, len(found) - self.keep)]:
            if old.name != keep_name:
                old.unlink(missing_ok=True)
                old.with_suffix(".json").unlink(missing_ok=True)

    # -- resuming ---------------------------------------------------------------------------------
    def find_valid(self, explicit: Path | None = None) -> Path | None:
        """Collective.  Rank 0 chooses the checkpoint (verifying it); every rank gets the same answer."""
        return collective_check(self.comm, lambda: self._choose(explicit))

    def _choose(self, explicit: Path | None) -> Path | None:
        if explicit is not None:
            if explicit.with_suffix(".json").exists():
                verify(explicit)
            load_file(explicit, check=False)
            return explicit
        problems = []
        for path in candidates(self.folder):
            try:
                manifest = verify(path)
            except CheckpointError as exc:
                log.warning("skipping checkpoint: %s; falling back to an older one", exc)
                problems.append(str(exc))
                continue
            if not manifest.get("manifest", True):
                log.warning(
                    "%s has no manifest (copied from another run?); it loads, so resuming from it", path.name
                )
            return path
        if problems:
            raise CheckpointError(
                f"none of the {len(problems)} checkpoint(s) in {self.folder} can be used (newest: {problems[0]}); "
                "repair or remove them, or pass --no-resume to archive them and start fresh"
            )
        return None

    def load(self, path: Path) -> dict[str, Any]:
        return load_file(path, check=False)
