"""Reading a checkpoint to continue from or to evaluate: the one path train, evaluate and visualize
share, so each says the same thing about a missing checkpoint or one of another model."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from megdet_hpc.checkpoint.checkpointer import Checkpointer
from megdet_hpc.checkpoint.io import CheckpointError
from megdet_hpc.config import Config, architecture_differences


def read_checkpoint(
    checkpointer: Checkpointer, cfg: Config, explicit: Path | None, *, required: bool, hint: str
) -> tuple[Path | None, dict[str, Any] | None]:
    """Collective.  ``explicit``, or the newest usable checkpoint in ``checkpointer.folder`` (older
    ones when the newest is damaged), loaded and checked to hold ``cfg``'s model -- ``hint`` ends that
    error ("use another train.output_dir or --no-resume").  ``(None, None)`` when there is none and
    it is not ``required``."""
    path = checkpointer.find_valid(explicit)
    if path is None:
        if required:
            raise CheckpointError(f"no usable checkpoint in {checkpointer.folder}")
        return None, None
    state = checkpointer.load(path)
    differences = architecture_differences(state.get("config", {}), cfg)
    if differences:
        raise CheckpointError(
            f"{path.name} was trained with another model ({'; '.join(differences)}); {hint}"
        )
    return path, state
