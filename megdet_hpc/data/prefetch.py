"""Move batches to the device one step ahead, overlapping the copy with the current step.

On CUDA the loader's workers deliver page-locked (pinned) batches, and this wrapper issues the next
batch's host-to-device copy and uint8 -> float conversion on a side stream while the current step
computes on the default one (the pattern of NVIDIA's and apex's ``data_prefetcher``); the consumer's
stream waits for that copy only when it takes the batch.  On the CPU it only converts the images.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator
from typing import Any

import torch

from megdet_hpc.data.coco import to_float

Batch = tuple[list[torch.Tensor], list[dict[str, Any]], tuple[int, int]]


def _shutdown_workers(batches: Iterator[Batch]) -> None:
    shutdown = getattr(batches, "_shutdown_workers", None)
    if callable(shutdown):
        shutdown()


def _to_device(batch: Batch, device: torch.device) -> Batch:
    images, targets, position = batch
    images = [to_float(img.to(device, non_blocking=True)) for img in images]
    targets = [
        {k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in t.items()}
        for t in targets
    ]
    return images, targets, position


class DevicePrefetcher:
    """Iterator over ``(images, targets, position)`` already on ``device``."""

    def __init__(self, batches: Iterator[Batch], device: torch.device) -> None:
        self.batches = batches
        self.device = device
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        # The loader's workers ignore SIGTERM (Slurm signals every process of a job step; the trainer
        # must checkpoint first), so Python's exit-time "terminate, then join" of child processes would
        # wait for them forever: shut them down when this iterator goes away or the interpreter exits,
        # whichever comes first (this runs before multiprocessing's own exit handler).
        self._finalizer = weakref.finalize(self, _shutdown_workers, batches)
        self._next: Batch | None = None
        if self.stream is not None:
            self._next = self._issue()

    def _issue(self) -> Batch | None:
        """Start the next batch's copy; None once the source is exhausted (a finite source still
        yields its last batch)."""
        batch = next(self.batches, None)
        if batch is None:
            return None
        assert self.stream is not None
        with torch.cuda.stream(self.stream):
            return _to_device(batch, self.device)

    def __iter__(self) -> DevicePrefetcher:
        return self

    def __next__(self) -> Batch:
        if self.stream is None:
            return _to_device(next(self.batches), self.device)
        if self._next is None:
            raise StopIteration
        current = torch.cuda.current_stream(self.device)
        current.wait_stream(self.stream)
        images, targets, position = self._next
        for tensor in [*images, *(v for t in targets for v in t.values() if torch.is_tensor(v))]:
            tensor.record_stream(current)  # the allocator must not reuse it while the step uses it
        self._next = self._issue()
        return images, targets, position

    def shutdown(self) -> None:
        """Stop the loader's worker processes now (idempotent)."""
        self._finalizer()
