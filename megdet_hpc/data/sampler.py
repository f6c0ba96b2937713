"""A deterministic, distributed, aspect-ratio-grouped and *resumable* batch sampler.

The unit is the **global batch**: ``total_batch`` image indices per optimizer step, all of one aspect
group (landscape or portrait, as detectron2's AspectRatioGroupedDataset and torchvision's
GroupedBatchSampler do), drawn from a permutation seeded by ``(seed, epoch)``.  Rank ``r`` of ``W``
takes slice ``r`` of every global batch.  Because the global batches do not depend on the world size,
a job resumed on another GPU count with the same total batch sees exactly the same images per step.

The state a checkpoint stores is ``{"epoch", "remaining"}``: the indices of the current epoch not yet
consumed, in order.  Restoring regroups them into batches of the (possibly new) total batch, so
nothing of the current epoch is repeated or skipped, whatever the new world size or batch.  The state
is taken for what the trainer *consumed*, not what DataLoader workers prefetched: every key carries
its ``(epoch, batch number)`` and ``state_after`` computes the state from those.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch

Key = tuple[int, int, int, int]  # (dataset index, flip seed, epoch, batch number in epoch)


def group_batches(order: Sequence[int], groups: Sequence[int], batch: int) -> list[list[int]]:
    """Fill one bucket per group in ``order``; emit a batch whenever a bucket reaches ``batch``."""
    buckets: dict[int, list[int]] = {}
    out = []
    for idx in order:
        bucket = buckets.setdefault(groups[idx], [])
        bucket.append(idx)
        if len(bucket) == batch:
            out.append(bucket[:])
            bucket.clear()
    return out


class ResumableGroupedSampler(torch.utils.data.Sampler[list[Key]]):
    """Yields this rank's keys for one optimizer step (``per_rank`` images) at a time, forever."""

    def __init__(
        self,
        aspect_ratios: Sequence[float],
        total_batch: int,
        rank: int,
        world_size: int,
        seed: int = 0,
        group_by_aspect: bool = True,
    ) -> None:
        if total_batch % world_size:
            raise ValueError(f"total batch {total_batch} is not divisible by the world size {world_size}")
        if total_batch > len(aspect_ratios):
            raise ValueError(f"total batch {total_batch} exceeds the dataset size {len(aspect_ratios)}")
        self.groups = [int(ar >= 1.0) if group_by_aspect else 0 for ar in aspect_ratios]
        self.total_batch = total_batch
        self.rank, self.world = rank, world_size
        self.per_rank = total_batch // world_size
        self.seed = seed
        self.epoch = 0
        self._resume_remaining: list[int] | None = None
        self._batches: dict[int, list[list[int]]] = {}

    # -- epochs -----------------------------------------------------------------------------------
    def _permutation(self, epoch: int) -> list[int]:
        gen = torch.Generator().manual_seed(self.seed * 100003 + epoch)
        return torch.randperm(len(self.groups), generator=gen).tolist()

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        if epoch not in self._batches:
            if epoch == self.epoch and self._resume_remaining is not None:
                order = self._resume_remaining
            else:
                order = self._permutation(epoch)
            batches = group_batches(order, self.groups, self.total_batch)
            if not batches:
                raise ValueError("no complete global batch: dataset too small for the total batch")
            self._batches = {e: b for e, b in self._batches.items() if e >= epoch - 1}
            self._batches[epoch] = batches
        return self._batches[epoch]

    def __iter__(self) -> Iterator[list[Key]]:
        epoch = self.epoch
        while True:
            for number, batch in enumerate(self.epoch_batches(epoch)):
                mine = batch[self.rank * self.per_rank : (self.rank + 1) * self.per_rank]
                yield [(idx, self._flip_seed(epoch, idx), epoch, number) for idx in mine]
            epoch += 1

    def _flip_seed(self, epoch: int, idx: int) -> int:
        return (self.seed * 1_000_003 + epoch * 7_919 + idx) % (2**31)

    def __len__(self) -> int:  # one epoch of steps (the stream itself is infinite)
        return len(self.epoch_batches(self.epoch))

    # -- state --------------------------------------------------------------------------------------
    def state_after(self, epoch: int, number: int) -> dict[str, Any]:
        """State once the global batch ``number`` of ``epoch`` has been consumed."""
        batches = self.epoch_batches(epoch)
        if number + 1 >= len(batches):
            return {"epoch": epoch + 1, "remaining": None}
        return {"epoch": epoch, "remaining": [i for b in batches[number + 1 :] for i in b]}

    def initial_state(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "remaining": self._resume_remaining}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore before iterating; ``remaining`` is regrouped with this sampler's total batch."""
        self.epoch = int(state["epoch"])
        remaining = state.get("remaining")
        if remaining is not None and any(not 0 <= i < len(self.groups) for i in remaining):
            raise ValueError("sampler state refers to images outside this dataset (different data?)")
        self._resume_remaining = list(remaining) if remaining is not None else None
        self._batches = {}
