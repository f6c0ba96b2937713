"""Local weights (a torchvision ResNet state_dict, every tensor arriving) and keyed fg/bg sampling."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torchvision

from megdet_hpc.config import ConfigError, load_config
from megdet_hpc.modeling import build_model
from megdet_hpc.modeling.sampling import PerImageSeededSampler, hash31, keyed_subset

SMALL = ["model.backbone=resnet18", "model.num_classes=3"]


def resnet18_file(tmp_path: Path, change=None) -> Path:  # type: ignore[no-untyped-def]
    """A torchvision-format ResNet-18 state_dict (what an ImageNet checkpoint file holds), made here."""
    torch.manual_seed(5)
    state = torchvision.models.resnet18(weights=None).state_dict()
    if change:
        change(state)
    path = tmp_path / "r18.pth"
    torch.save(state, path)
    return path


def test_every_backbone_tensor_arrives(tmp_path: Path) -> None:
    path = resnet18_file(tmp_path)
    state = torch.load(path, weights_only=True)
    model = build_model(load_config(None, [*SMALL, f"model.backbone_weights={path}"]))
    body = model.backbone.body.state_dict()
    compared = [k for k in state if not k.startswith("fc.")]
    assert compared and all(torch.equal(body[k], state[k]) for k in compared)
    assert len(compared) == len(body)  # nothing of the body left at its random initialisation


def test_partial_or_foreign_weights_are_errors_naming_the_keys(tmp_path: Path) -> None:
    missing = resnet18_file(tmp_path, lambda s: [s.pop(k) for k in ("layer4.1.bn2.weight", "conv1.weight")])
    with pytest.raises(ConfigError, match=r"2 missing key\(s\) \(conv1.weight, layer4.1.bn2.weight\)"):
        build_model(load_config(None, [*SMALL, f"model.backbone_weights={missing}"]))
    extra = resnet18_file(tmp_path, lambda s: s.update({"head.extra.weight": torch.zeros(1)}))
    with pytest.raises(ConfigError, match=r"1 unexpected key\(s\) \(head.extra.weight\)"):
        build_model(load_config(None, [*SMALL, f"model.backbone_weights={extra}"]))
    with pytest.raises(ConfigError, match="does not fit resnet50: size mismatch"):
        build_model(
            load_config(
                None,
                [
                    "model.backbone=resnet50",
                    "model.num_classes=3",
                    f"model.backbone_weights={resnet18_file(tmp_path)}",
                ],
            )
        )


def test_ddp_prefixed_weights_load(tmp_path: Path) -> None:
    path = resnet18_file(tmp_path, lambda s: [s.update({f"module.{k}": s.pop(k)}) for k in list(s)])
    build_model(load_config(None, [*SMALL, f"model.backbone_weights={path}"]))


def test_keyed_subsets_are_deterministic_uniform_and_device_independent() -> None:
    candidates = torch.arange(1000) * 3
    a, b = keyed_subset(candidates, 50, 11), keyed_subset(candidates, 50, 11)
    assert torch.equal(a, b) and len(set(a.tolist())) == 50 and set(a.tolist()) <= set(candidates.tolist())
    assert not torch.equal(torch.sort(a).values, torch.sort(keyed_subset(candidates, 50, 12)).values)
    assert hash31(torch.tensor([0, 1, 2**31 - 1]), 2**40).min() >= 0  # 31-bit, no overflow
    counts = torch.zeros(100)
    for seed in range(1000):
        counts[keyed_subset(torch.arange(100), 10, seed)] += 1
    assert counts.min() > 60 and counts.max() < 140  # 100 expected


def test_an_image_draws_the_same_samples_whatever_its_neighbours() -> None:
    """What makes 2 ranks x 1 image the same step as 1 rank x 2 images."""
    sampler = PerImageSeededSampler(16, 0.25, salt=1)
    gen = torch.Generator().manual_seed(0)
    a, b = (torch.randint(-1, 3, (500,), generator=gen) for _ in range(2))
    sampler.keys = [7, 9]
    pos_pair, neg_pair = sampler([a, b])
    sampler.keys = [9]
    pos_b, neg_b = sampler([b])
    assert torch.equal(pos_pair[1], pos_b[0]) and torch.equal(neg_pair[1], neg_b[0])
    assert int(pos_pair[0].sum() + neg_pair[0].sum()) == 16


def test_keyed_draws_are_independent_across_steps_images_and_samplers() -> None:
    """Second order, with the keys training uses (``set_sampling_keys``): the same image at the next
    step, the next image at the same step, and the RoI sampler beside the RPN one draw subsets that
    overlap as independent uniform draws do (k^2/n), and a draw spreads over the candidates' index
    blocks with the hypergeometric variance -- no structure a hash could leave.  (The parity ablation
    traced megdet_hpc's mid-schedule lead to the sampler's random stream; this is why it is not a bias
    of the draw: experiments/results/parity_long/ablation_samplers.md.)"""
    from statistics import fmean
    from types import SimpleNamespace

    from megdet_hpc.modeling import set_sampling_keys

    rpn, roi = PerImageSeededSampler(128, 0.5, salt=1), PerImageSeededSampler(128, 0.5, salt=2)
    model = SimpleNamespace(
        rpn=SimpleNamespace(fg_bg_sampler=rpn), roi_heads=SimpleNamespace(fg_bg_sampler=roi)
    )
    n, k = 2000, 128
    background = torch.zeros(n, dtype=torch.int64)  # every candidate a negative: k of n drawn

    def drawn(sampler: PerImageSeededSampler, step: int, image: int) -> set[int]:
        set_sampling_keys(model, step, [image], seed=3)
        return set(torch.where(sampler([background])[1][0])[0].tolist())

    overlaps: dict[str, list[int]] = {"next step": [], "next image": [], "RoI beside RPN": []}
    spread = []
    for t in range(200):
        step, image = 4 * t, 1000 + t % 50
        first = drawn(rpn, step, image)
        assert len(first) == k
        overlaps["next step"].append(len(first & drawn(rpn, step + 4, image)))
        overlaps["next image"].append(len(first & drawn(rpn, step, image + 1)))
        overlaps["RoI beside RPN"].append(len(first & drawn(roi, step, image)))
        per_block = torch.bincount(torch.tensor(sorted(first)) // (n // 10), minlength=10).float()
        spread.append(per_block.var(unbiased=False).item())
    for name, counts in overlaps.items():
        assert abs(fmean(counts) - k * k / n) < 1.0, (name, fmean(counts))  # 8.2 expected, s.e. ~0.2
    assert abs(fmean(spread) - k * 0.1 * 0.9 * (n - k) / (n - 1)) < 2.0, fmean(spread)  # 10.8, s.e. ~0.5
