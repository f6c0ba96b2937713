"""RPN/RoI fg-bg sampling that is a function of (seed, step, image), not of the global RNG stream.

torchvision's BalancedPositiveNegativeSampler draws with the process-global RNG image after image, so
the anchors/RoIs an image gets depend on which images came before it *on that rank*.  MegDet's claim
-- 2 GPUs x 1 image with CGBN is the same step as 1 GPU x 2 images -- is only testable if each image
draws the same samples in both layouts; keying the draw by (seed, step, image id) makes that so, and
makes training bit-reproducible across restarts.

The draw is a counter-based hash of (key, candidate index) computed where the candidates live: a
subset of k candidates is the k with the smallest hash.  No generator objects, no host-side
permutation of ~10^5 anchors per image and no host-to-device copy of it (what a CPU ``torch.Generator``
would cost on a GPU), and the same subset on CPU and CUDA.

No host synchronisation either: the count of positives is data (known only on the device), so the
selection never builds an index list of data-dependent length (``torch.where``/``nonzero`` copy that
length to the host, twice per image per sampler).  Every anchor gets a key -- (hash, index) for a
candidate, a sentinel above all of them for the rest -- and a ``topk`` of the fixed size
``batch * fraction`` (positives) or ``batch`` (negatives) picks the smallest; entries holding the
sentinel, and negatives past ``batch - #positives``, are masked off on the device.  Same subsets as
picking the k smallest hashes among the candidates (ties, now broken by index, aside).
"""

from __future__ import annotations

import torch
from torchvision.models.detection._utils import BalancedPositiveNegativeSampler

_MASK31 = (1 << 31) - 1
_NOT_A_CANDIDATE = 1 << 62  # above every (hash << 31 | index) key


def hash31(index: torch.Tensor, seed: int) -> torch.Tensor:
    """A 31-bit integer hash of ``index`` (int64, < 2^31) salted by ``seed``.

    Integer-only and overflow-free in int64 (every product stays < 2^62), so CPU and CUDA agree bit for
    bit; the mixing is the classic xorshift-multiply "hash32" rounds.
    """
    h = (index * 1103515245 + (seed & _MASK31)) & _MASK31
    for _ in range(2):
        h = h ^ (h >> 16)
        h = (h * 0x45D9F3B) & _MASK31
    return h ^ (h >> 16)


def keyed_subset(candidates: torch.Tensor, count: int, seed: int) -> torch.Tensor:
    """``count`` of ``candidates`` (indices), chosen uniformly at random by ``seed``."""
    if count <= 0:
        return candidates[:0]
    if count >= candidates.numel():
        return candidates
    scores = hash31(candidates, seed)
    return candidates[torch.topk(scores, count, largest=False, sorted=False).indices]


def _keys(candidate: torch.Tensor, index: torch.Tensor, seed: int) -> torch.Tensor:
    """Distinct int64 sort keys: the candidate's hash, ties broken by index; non-candidates last."""
    key = (hash31(index, seed) << 31) | index
    return torch.where(candidate, key, torch.full_like(key, _NOT_A_CANDIDATE))


def _smallest(keys: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(indices, is-a-candidate) of the ``k`` smallest keys, in increasing key order."""
    values, indices = torch.topk(keys, min(k, keys.numel()), largest=False, sorted=True)
    return indices, values < _NOT_A_CANDIDATE


def balanced_masks(
    matched: torch.Tensor, batch_size: int, positive_fraction: float, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 (positive, negative) masks over ``matched`` (>= 1 fg, 0 bg, < 0 ignored): up to
    ``batch_size * positive_fraction`` positives and negatives filling the batch, drawn by ``seed``;
    no host synchronisation."""
    index = torch.arange(matched.numel(), device=matched.device)
    pos_mask = torch.zeros_like(matched, dtype=torch.uint8)
    neg_mask = torch.zeros_like(matched, dtype=torch.uint8)
    if matched.numel() == 0:
        return pos_mask, neg_mask
    pos_at, pos_ok = _smallest(_keys(matched >= 1, index, seed), int(batch_size * positive_fraction))
    neg_at, neg_ok = _smallest(_keys(matched == 0, index, seed ^ 0x5BD1E995), batch_size)
    room = batch_size - pos_ok.sum()  # a device scalar: the batch left for negatives
    neg_ok = neg_ok & (torch.arange(neg_at.numel(), device=matched.device) < room)
    pos_mask.scatter_(0, pos_at, pos_ok.to(torch.uint8))
    neg_mask.scatter_(0, neg_at, neg_ok.to(torch.uint8))
    return pos_mask, neg_mask


class PerImageSeededSampler(BalancedPositiveNegativeSampler):
    """Drop-in for BalancedPositiveNegativeSampler; set ``keys`` (one int per image) before forward."""

    def __init__(self, batch_size_per_image: int, positive_fraction: float, salt: int) -> None:
        super().__init__(batch_size_per_image, positive_fraction)
        self.salt = salt
        self.keys: list[int] | None = None

    def __call__(self, matched_idxs: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        if self.keys is None or len(self.keys) != len(matched_idxs):
            return super().__call__(matched_idxs)
        pos_idx, neg_idx = [], []
        for key, matched in zip(self.keys, matched_idxs):
            seed = (key * 1_000_003 + self.salt) % _MASK31
            pos_mask, neg_mask = balanced_masks(
                matched, self.batch_size_per_image, self.positive_fraction, seed
            )
            pos_idx.append(pos_mask)
            neg_idx.append(neg_mask)
        return pos_idx, neg_idx


def install_seeded_samplers(model: torch.nn.Module) -> None:
    rpn, roi = model.rpn, model.roi_heads
    rpn.fg_bg_sampler = PerImageSeededSampler(
        rpn.fg_bg_sampler.batch_size_per_image, rpn.fg_bg_sampler.positive_fraction, salt=1
    )
    roi.fg_bg_sampler = PerImageSeededSampler(
        roi.fg_bg_sampler.batch_size_per_image, roi.fg_bg_sampler.positive_fraction, salt=2
    )


def set_sampling_keys(model: torch.nn.Module, step: int, image_ids: list[int], seed: int = 0) -> None:
    """Key every image's draw by (seed, step, image id) for the coming forward pass."""
    keys = [(seed * 7_777_777 + step) * 1_000_000_007 + int(i) for i in image_ids]
    for sampler in (model.rpn.fg_bg_sampler, model.roi_heads.fg_bg_sampler):
        if isinstance(sampler, PerImageSeededSampler):
            sampler.keys = keys
