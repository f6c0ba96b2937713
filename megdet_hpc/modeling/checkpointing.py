"""MegDet's sub-linear memory: recompute ResNet stages (and optionally the FPN) in backward.

Which stages: ``layer1``-``layer3`` (res2-res4), not ``layer4``.  Activation memory falls with the
resolution (a stage at stride 32 holds ~5% of the backbone's activations at 800 px) while compute
does not (``layer4`` is ~20% of the backbone's FLOPs), so recomputing ``layer4`` would buy little
memory for a fifth of the recomputation time (``bench/activation_memory.py`` measures both).

MegDet trained at large image sizes with 2 images per GPU by keeping fewer activations.  Here each
checkpointed part stores only its input and recomputes its activations in backward
(``torch.utils.checkpoint``, non-reentrant), through ``layers.recompute`` so CGBN layers inside reuse
their forward statistics instead of issuing collectives and updating running statistics again.
State-dict keys do not change: the stage is the same modules in an ``nn.Sequential`` subclass.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torchvision.ops.feature_pyramid_network import FeaturePyramidNetwork

from megdet_hpc.layers.recompute import checkpointed, should_checkpoint

# The stages recomputed (see the module docstring for why not layer4).
RESNET_STAGES = ("layer1", "layer2", "layer3")


class CheckpointedSequential(nn.Sequential):
    """A ResNet stage whose activations are recomputed in backward."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        if should_checkpoint(self):
            return checkpointed(super().forward, x)
        return super().forward(x)


class CheckpointedFeaturePyramidNetwork(FeaturePyramidNetwork):
    """torchvision's FPN, recomputed in backward (a class swap keeps its weights and keys)."""

    def forward(self, x: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:  # type: ignore[override]
        if should_checkpoint(self):
            return checkpointed(super().forward, x)
        return super().forward(x)


def enable_activation_checkpointing(model: nn.Module, places: Sequence[str]) -> None:
    """Checkpoint the ResNet stages (``"backbone"``) and/or the FPN (``"fpn"``) of a torchvision
    Faster R-CNN, in place."""
    body, fpn = model.backbone.body, model.backbone.fpn
    if "backbone" in places:
        for name in RESNET_STAGES:
            if name in body:
                setattr(body, name, CheckpointedSequential(*getattr(body, name).children()))
    if "fpn" in places:
        fpn.__class__ = CheckpointedFeaturePyramidNetwork
