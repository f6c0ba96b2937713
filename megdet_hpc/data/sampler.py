"""A deterministic, distributed, aspect-ratio-grouped and *resumable* batch sampler.

The unit is the **global batch**: ``images_per_pass`` image indices per forward/backward pass over all
ranks (world size x images per GPU; ``solver.total_batch`` divided by ``solver.grad_accum``: a step
with gradient accumulation takes several), all of one aspect group (landscape or portrait, as
detectron2's AspectRatioGroupedDataset and torchvision's GroupedBatchSampler do), drawn from a
permutation seeded by ``(seed, epoch)``.  Rank ``r`` of ``W`` takes slice ``r`` of every global batch.
Because the global batches do not depend on the world size, a job resumed on another GPU count with
the same images per pass sees exactly the same images per pass.

The state a checkpoint stores is ``{"epoch", "remaining"}``: the indices of the current epoch not yet
consumed, in order (whole global batches).  Restoring regroups them into batches of the (possibly new)
images per pass.  With another number a group's remainder may not fill a last batch (8 images left,
batches of 6): that **bridge** batch is completed with the first images of that group in the next
epoch's permutation, and those images are then left out of the next epoch -- so nothing of the
current epoch is skipped (it used to be dropped with the incomplete bucket) and nothing is repeated,
in this epoch or the next, whatever the new world size or batch.  The state
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
    """Yields this rank's keys for one pass (``per_rank`` images) at a time, forever."""

    def __init__(
        self,
        aspect_ratios: Sequence[float],
        images_per_pass: int,
        rank: int,
        world_size: int,
        seed: int = 0,
        group_by_aspect: bool = True,
    ) -> None:
        if images_per_pass % world_size:
            raise ValueError(
                f"{images_per_pass} images per pass are not divisible by the world size {world_size}"
            )
        if images_per_pass > len(aspect_ratios):
            raise ValueError(
                f"{images_per_pass} images per pass exceed the dataset size {len(aspect_ratios)}"
            )
        self.groups = [int(ar >= 1.0) if group_by_aspect else 0 for ar in aspect_ratios]
        self.images_per_pass = images_per_pass
        self.rank, self.world = rank, world_size
        self.per_rank = images_per_pass // world_size
        self.seed = seed
        self.epoch = 0
        self._resume_remaining: list[int] | None = None
        self._batches: dict[int, list[list[int]]] = {}
        self._borrowed: dict[int, set[int]] = {}  # epoch -> its images a bridge batch already used

    # -- epochs -----------------------------------------------------------------------------------
    def _permutation(self, epoch: int) -> list[int]:
        gen = torch.Generator().manual_seed(self.seed * 100003 + epoch)
        return torch.randperm(len(self.groups), generator=gen).tolist()

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        resumed = epoch == self.epoch and self._resume_remaining is not None
        if epoch not in self._batches:
            if self._resume_remaining is not None and epoch == self.epoch + 1:
                self.epoch_batches(self.epoch)  # its bridge decides what this epoch lends
            if resumed:
                order = list(self._resume_remaining)  # type: ignore[arg-type]
            else:
                borrowed = self._borrowed.get(epoch, set())
                order = [i for i in self._permutation(epoch) if i not in borrowed]
            batches = group_batches(order, self.groups, self.images_per_pass)
            if resumed:
                batches += self._bridge(order, batches, epoch)
            if not batches:
                raise ValueError("no complete global batch: dataset too small for the images per pass")
            self._batches = {e: b for e, b in self._batches.items() if e >= epoch - 1}
            self._batches[epoch] = batches
        return self._batches[epoch]

    def _bridge(self, order: list[int], batches: list[list[int]], epoch: int) -> list[list[int]]:
        """Complete each group's leftover of a regrouped remainder with that group's first images of
        the next epoch (recorded as borrowed from it).  A group smaller than a batch stays dropped."""
        used = {i for b in batches for i in b}
        leftovers: dict[int, list[int]] = {}
        for idx in order:
            if idx not in used:
                leftovers.setdefault(self.groups[idx], []).append(idx)
        bridges, borrowed = [], self._borrowed.setdefault(epoch + 1, set())
        following = self._permutation(epoch + 1)
        pending = set(order)  # prefer images this job does not train on again before the epoch ends
        following.sort(key=lambda i: i in pending)  # stable: permutation order within each part
        for group, left in leftovers.items():
            need = self.images_per_pass - len(left)
            fill = [i for i in following if self.groups[i] == group and i not in left and i not in borrowed]
            fill = fill[:need]
            if len(fill) == need:
                bridges.append(left + fill)
                borrowed.update(fill)
        return bridges

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
            if self._borrowed.get(epoch + 1):  # the next epoch lent images to a bridge batch
                rest = [i for b in self.epoch_batches(epoch + 1) for i in b]
                return {"epoch": epoch + 1, "remaining": rest}
            return {"epoch": epoch + 1, "remaining": None}
        state: dict[str, Any] = {"epoch": epoch, "remaining": [i for b in batches[number + 1 :] for i in b]}
        if self._borrowed.get(epoch + 1):  # a bridge batch ahead already used these of the next epoch
            state["borrowed"] = sorted(self._borrowed[epoch + 1])
        return state

    def initial_state(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "remaining": self._resume_remaining}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore before iterating; ``remaining`` is regrouped with this sampler's images per pass."""
        self.epoch = int(state["epoch"])
        remaining = state.get("remaining")
        if remaining is not None and any(not 0 <= i < len(self.groups) for i in remaining):
            raise ValueError("sampler state refers to images outside this dataset (different data?)")
        self._resume_remaining = list(remaining) if remaining is not None else None
        self._batches = {}
        self._borrowed = {self.epoch + 1: {int(i) for i in state.get("borrowed") or []}}
