"""RPN/RoI fg-bg sampling that is a function of (step, image), not of the global RNG stream.

torchvision's BalancedPositiveNegativeSampler draws with the process-global RNG image after image, so
the anchors/RoIs an image gets depend on which images came before it *on that rank*.  MegDet's claim
-- 2 GPUs x 1 image with CGBN is the same step as 1 GPU x 2 images -- is only testable if each image
draws the same samples in both layouts; seeding a generator per (seed, step, image id) makes that so,
and makes training bit-reproducible across restarts.
"""

from __future__ import annotations

import torch
from torchvision.models.detection._utils import BalancedPositiveNegativeSampler


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
            gen = torch.Generator(device="cpu").manual_seed((key * 1_000_003 + self.salt) % (2**63 - 1))
            positive = torch.where(matched >= 1)[0]
            negative = torch.where(matched == 0)[0]
            num_pos = min(positive.numel(), int(self.batch_size_per_image * self.positive_fraction))
            num_neg = min(negative.numel(), self.batch_size_per_image - num_pos)
            perm1 = torch.randperm(positive.numel(), generator=gen)[:num_pos].to(positive.device)
            perm2 = torch.randperm(negative.numel(), generator=gen)[:num_neg].to(negative.device)
            pos_mask = torch.zeros_like(matched, dtype=torch.uint8)
            neg_mask = torch.zeros_like(matched, dtype=torch.uint8)
            pos_mask[positive[perm1]] = 1
            neg_mask[negative[perm2]] = 1
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
