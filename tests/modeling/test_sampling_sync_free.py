"""The fg/bg samplers issue no host synchronisation and draw what the index-list version drew.

FakeTensorMode runs the sampler without data: any op whose output shape depends on values
(``torch.where(cond)``, ``nonzero``, ``.item()`` -- each a device-to-host copy on CUDA) raises there.
"""

from __future__ import annotations

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from megdet_hpc.modeling.sampling import PerImageSeededSampler, keyed_subset


def reference(
    matched: torch.Tensor, batch: int, fraction: float, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The previous, index-list implementation (two ``torch.where`` per image)."""
    positive = torch.where(matched >= 1)[0]
    negative = torch.where(matched == 0)[0]
    num_pos = min(positive.numel(), int(batch * fraction))
    num_neg = min(negative.numel(), batch - num_pos)
    pos = torch.zeros_like(matched, dtype=torch.uint8)
    neg = torch.zeros_like(matched, dtype=torch.uint8)
    pos[keyed_subset(positive, num_pos, seed)] = 1
    neg[keyed_subset(negative, num_neg, seed ^ 0x5BD1E995)] = 1
    return pos, neg


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_sampler_runs_without_data(device: str) -> None:
    sampler = PerImageSeededSampler(256, 0.5, salt=1)
    sampler.keys = [3, 4]
    with FakeTensorMode(allow_non_fake_inputs=False):
        matched = [torch.randint(-2, 3, (n,), device=device) for n in (20_000, 37)]
        pos, neg = sampler(matched)
    assert [p.shape for p in pos] == [m.shape for m in matched] and pos[0].device.type == device
    assert neg[1].dtype == torch.uint8


def test_same_samples_as_the_index_list_version() -> None:
    gen = torch.Generator().manual_seed(0)
    sampler = PerImageSeededSampler(64, 0.25, salt=2)
    for trial in range(40):
        n = int(torch.randint(1, 3000, (1,), generator=gen))
        fg = float(torch.rand((), generator=gen)) * 0.1  # few positives: the negatives fill the batch
        u = torch.rand(n, generator=gen)
        matched = torch.where(u < fg, 1, torch.where(u < 0.7, 0, -1))
        if trial % 7 == 0:
            matched = torch.full((n,), -1)  # nothing to draw
        sampler.keys = [trial * 31]
        (pos,), (neg,) = sampler([matched])
        seed = (trial * 31 * 1_000_003 + 2) % ((1 << 31) - 1)
        want_pos, want_neg = reference(matched, 64, 0.25, seed)
        assert torch.equal(pos, want_pos) and torch.equal(neg, want_neg), trial
        assert int(pos.sum()) == min(int((matched >= 1).sum()), 16)
        assert int(neg.sum()) == min(int((matched == 0).sum()), 64 - int(pos.sum()))
