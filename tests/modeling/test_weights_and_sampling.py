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
