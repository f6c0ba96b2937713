"""Load a checkpoint's weights into a model, or say exactly which tensors do not fit.

torch's own ``load_state_dict`` error is hundreds of lines, and its first line ("Error(s) in loading
state_dict for FasterRCNN:") names nothing; "the weights do not fit" alone sends the user looking
in the wrong place.  The message names the differing keys -- shape mismatches first, with both
shapes (another ``model.num_classes`` is ``roi_heads.box_predictor.cls_score.weight: [4, 64] in the
file, [6, 64] in the model``), then missing and unexpected ones -- three of each at most, with counts.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from megdet_hpc.checkpoint.io import CheckpointError

if TYPE_CHECKING:
    from megdet_hpc.config import Config
    from megdet_hpc.distributed import Comm

SHOWN = 3


def _listed(keys: list[str]) -> str:
    more = f", ... ({len(keys)} in all)" if len(keys) > SHOWN else ""
    return ", ".join(keys[:SHOWN]) + more


def mismatches(model: nn.Module, state: dict[str, Any]) -> list[str]:
    """What keeps ``state`` from loading into ``model`` strictly, as short phrases (empty: it fits)."""
    own = model.state_dict()
    shapes = [
        f"{k}: {list(v.shape)} in the file, {list(own[k].shape)} in the model"
        for k, v in state.items()
        if k in own and isinstance(v, torch.Tensor) and v.shape != own[k].shape
    ]
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    parts = []
    if shapes:
        parts.append(f"{len(shapes)} of another shape ({_listed(shapes)})")
    if missing:
        parts.append(f"{len(missing)} missing ({_listed(missing)})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected ({_listed(unexpected)})")
    return parts


def check_fits(model: nn.Module, state: dict[str, Any], name: str) -> None:
    """A one-line ``CheckpointError`` naming the keys when ``state`` does not load into ``model``."""
    parts = mismatches(model, state)
    if parts:
        raise CheckpointError(f"{name}: weights do not fit the model: {'; '.join(parts)}")


def load_weights(model: nn.Module, state: dict[str, Any], name: str) -> None:
    """``model.load_state_dict(state)`` (strict); a one-line ``CheckpointError`` naming the keys."""
    check_fits(model, state, name)
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:  # anything the comparison above cannot see
        raise CheckpointError(f"{name}: weights do not fit the model ({str(exc).splitlines()[0]})") from exc


def model_from_checkpoint(
    cfg: Config, comm: Comm, explicit: Path | None, hint: str = "use its own config"
) -> tuple[nn.Module, Path]:
    """Collective.  ``cfg``'s model with the weights of ``explicit`` or of the newest usable checkpoint
    in ``train.output_dir`` -- read-only (no lock: safe beside a running training).  What evaluate and
    visualize load; training resumes through the same ``read_checkpoint``."""
    from megdet_hpc.checkpoint import Checkpointer
    from megdet_hpc.checkpoint.restore import read_checkpoint
    from megdet_hpc.modeling.detector import build_model

    checkpointer = Checkpointer(Path(cfg.train.output_dir), comm, background=False)
    path, state = read_checkpoint(checkpointer, cfg, explicit, required=True, hint=hint)
    assert path is not None and state is not None
    model = build_model(cfg)
    load_weights(model, state["model"], path.name)
    return model, path
