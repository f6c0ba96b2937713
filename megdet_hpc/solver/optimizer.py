"""SGD with per-parameter-kind weight decay (norm weights and biases may be excluded)."""

from __future__ import annotations

import torch
from torch import nn

from megdet_hpc.config import Config

NORM_TYPES = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm)


def build_optimizer(cfg: Config, model: nn.Module) -> torch.optim.SGD:
    s = cfg.solver
    norm_params = {id(p) for m in model.modules() if isinstance(m, NORM_TYPES) for p in m.parameters(False)}
    groups: dict[str, list[nn.Parameter]] = {"norm": [], "bias": [], "weight": []}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        kind = "norm" if id(p) in norm_params else ("bias" if name.endswith(".bias") else "weight")
        groups[kind].append(p)
    decay = {"norm": s.weight_decay_norm, "bias": s.weight_decay_bias, "weight": s.weight_decay}
    param_groups = [{"params": ps, "weight_decay": decay[k], "name": k} for k, ps in groups.items() if ps]
    return torch.optim.SGD(param_groups, lr=s.base_lr, momentum=s.momentum)
