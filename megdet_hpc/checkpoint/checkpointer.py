"""Periodic, optionally background, checkpointing and resume with fallback.

Rank 0 writes; every rank takes part in gathering RNG states (one object allgather).  Background
mode snapshots the state to CPU on the training thread (the only stall) and writes on a worker thread;
at most one save is in flight.  Resume picks the newest *valid* checkpoint (pointer first): rank 0
verifies checksums and falls back past corrupt or truncated files with a warning, then tells every
rank which file to read.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import Any

import torch

from megdet_hpc.checkpoint.io import (
    NAME_RE,
    POINTER,
    CheckpointError,
    candidates,
    load_file,
    remove_stale_temporaries,
    verify,
    write_checkpoint,
)
from megdet_hpc.distributed import Comm

log = logging.getLogger("megdet_hpc.checkpoint")


def snapshot(obj: Any) -> Any:
    """Deep copy with every tensor cloned to CPU, so training can go on while a thread writes."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: snapshot(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(snapshot(v) for v in obj)
    return obj


class Checkpointer:
    def __init__(self, folder: Path, comm: Comm, keep: int = 3, background: bool = True) -> None:
        self.folder = Path(folder)
        self.comm = comm
        self.keep = keep
        self.background = background
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self.last_stall_s = 0.0
        self.last_write_s = 0.0
        if comm.is_main:
            self.folder.mkdir(parents=True, exist_ok=True)
            stale = remove_stale_temporaries(self.folder)
            if stale:
                log.warning("removed %d temporary file(s) of an interrupted checkpoint save", stale)

    # -- saving -----------------------------------------------------------------------------------
    def save(self, iteration: int, state: dict[str, Any], meta: dict[str, Any], block: bool = False) -> None:
        """Collective: call on every rank.  ``state`` must already hold the gathered RNG states."""
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
        except BaseException as exc:  # re-raised on the training thread by wait()
            self._error = exc
        self.last_write_s = time.perf_counter() - start

    def wait(self) -> None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            err, self._error = self._error, None
            raise CheckpointError(f"checkpoint save failed: {err}") from err

    def _prune(self, keep_name: str) -> None:
        found = sorted(
            (p for p in self.folder.iterdir() if NAME_RE.match(p.name)),
            key=lambda p: int(NAME_RE.match(p.name).group(1)),  # type: ignore[union-attr]
        )
        for old in found[: max(0, len(found) - self.keep)]:
            if old.name != keep_name:
                old.unlink(missing_ok=True)
                old.with_suffix(".json").unlink(missing_ok=True)

    def archive_previous_run(self) -> Path | None:
        """``--no-resume``: move an earlier run's checkpoints, pointer and metrics into
        ``archive/<time>/`` (rank 0) so a fresh start neither resumes from nor overwrites them."""
        moved: Path | None = None
        if self.comm.is_main and self.folder.is_dir():
            names = [p for p in self.folder.iterdir()
                     if NAME_RE.match(p.name) or p.name in (POINTER, "metrics.jsonl")
                     or (p.suffix == ".json" and NAME_RE.match(p.with_suffix(".pth").name))]  # fmt: skip
            if names:
                moved = self.folder / "archive" / time.strftime("%Y%m%d-%H%M%S")
                moved.mkdir(parents=True, exist_ok=False)
                for p in names:
                    p.rename(moved / p.name)
                log.warning("--no-resume: moved the previous run's %d file(s) to %s", len(names), moved)
        self.comm.barrier()
        return moved

    # -- resuming ---------------------------------------------------------------------------------
    def find_valid(self, explicit: Path | None = None) -> Path | None:
        """Rank 0 chooses the checkpoint (verifying it), every rank gets the same answer."""
        choice: str | None = None
        error: str | None = None
        if self.comm.is_main:
            if explicit is not None:
                try:
                    if explicit.with_suffix(".json").exists():
                        verify(explicit)
                    load_file(explicit, check=False)
                    choice = str(explicit)
                except CheckpointError as exc:
                    error = str(exc)
            else:
                for path in candidates(self.folder):
                    try:
                        verify(path)
                        choice = str(path)
                        break
                    except CheckpointError as exc:
                        log.warning("skipping checkpoint: %s; falling back to an older one", exc)
        choice, error = self.comm.broadcast_object((choice, error), root=0)
        if error:
            raise CheckpointError(error)
        return Path(choice) if choice else None

    def load(self, path: Path) -> dict[str, Any]:
        return load_file(path, check=False)

    @property
    def pointer(self) -> Path:
        return self.folder / POINTER
