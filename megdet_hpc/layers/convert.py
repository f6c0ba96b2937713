"""Swap BatchNorm layers of a model for CGBN (the analogue of ``SyncBatchNorm.convert_sync_batchnorm``)."""

from __future__ import annotations

import sys

import torch
from torch import nn

from megdet_hpc.layers.cgbn import CrossGPUBatchNorm2d


def _frozen_batch_norm_type() -> type | None:
    """torchvision's ``FrozenBatchNorm2d`` if torchvision is loaded, else None: a model holding one
    has imported it, and a process that only needs CGBN (the statistics workers, a custom model) does
    not pay torchvision's import (~3 s of CPU per rank: its ops import ``torch._dynamo``)."""
    return getattr(sys.modules.get("torchvision.ops.misc"), "FrozenBatchNorm2d", None)


def convert_to_cgbn(
    module: nn.Module,
    group_size: int | None = None,
    convert_frozen: bool = False,
    two_pass: bool = False,
    kernels: str = "auto",
) -> nn.Module:
    """Return ``module`` with every ``nn.BatchNorm2d`` (and ``FrozenBatchNorm2d`` if asked) replaced.

    Parameters, buffers, ``requires_grad`` and train/eval mode are copied, so a converted model
    computes exactly what the original did until it trains.  FrozenBatchNorm2d becomes a *trainable*
    CGBN (MegDet trains backbone BN instead of freezing it).
    """
    if isinstance(module, CrossGPUBatchNorm2d):
        return module
    if isinstance(module, nn.BatchNorm2d):
        # Like torch's convert_sync_batchnorm: the module's own parameters and buffers move over, so
        # their dtype (a .half() model), device and requires_grad are kept as they are.
        new = CrossGPUBatchNorm2d(
            module.num_features,
            module.eps,
            module.momentum,
            module.affine,
            module.track_running_stats,
            group_size=group_size,
            two_pass=two_pass,
            kernels=kernels,
        )
        if module.affine:
            new.weight, new.bias = module.weight, module.bias
        new.running_mean = module.running_mean
        new.running_var = module.running_var
        new.num_batches_tracked = module.num_batches_tracked
        new.train(module.training)
        return new
    frozen = _frozen_batch_norm_type() if convert_frozen else None
    if frozen is not None and isinstance(module, frozen):
        new = CrossGPUBatchNorm2d(
            module.weight.numel(), module.eps, group_size=group_size, two_pass=two_pass, kernels=kernels
        )
        with torch.no_grad():
            new.weight.copy_(module.weight)
            new.bias.copy_(module.bias)
            new.running_mean.copy_(module.running_mean)
            new.running_var.copy_(module.running_var)
        new.to(module.weight.device)
        new.train(module.training)
        return new
    for name, child in module.named_children():
        converted = convert_to_cgbn(child, group_size, convert_frozen, two_pass, kernels)
        if converted is not child:
            setattr(module, name, converted)
    return module


def count_cgbn(module: nn.Module) -> int:
    return sum(isinstance(m, CrossGPUBatchNorm2d) for m in module.modules())
