"""Activation checkpointing that is safe for layers with side effects (CGBN).

``torch.utils.checkpoint`` runs a segment's forward twice: once normally and once in backward to
regenerate the tensors it did not keep.  A CGBN layer's forward has side effects: it issues a
collective and updates its running statistics.  Run twice, it would update the statistics twice and
-- worse -- issue an extra collective in backward on some ranks and not others.  So the two passes
run under two contexts (``checkpoint(..., context_fn=recompute_contexts)``): while *recording*, a
CGBN layer computes its group statistics as usual and also queues them; while *replaying*, it takes
them from its queue instead -- no collective, no running-statistics update, the same numbers.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.checkpoint import checkpoint

RECORD = "record"
REPLAY = "replay"


class _Mode(threading.local):
    value: str | None = None


_mode = _Mode()


def current_mode() -> str | None:
    """``"record"`` in a checkpointed forward, ``"replay"`` in its recomputation, else None."""
    return _mode.value


@contextlib.contextmanager
def _set_mode(value: str) -> Iterator[None]:
    previous, _mode.value = _mode.value, value
    try:
        yield
    finally:
        _mode.value = previous


def recompute_contexts() -> tuple[
    contextlib.AbstractContextManager[None], contextlib.AbstractContextManager[None]
]:
    """``context_fn`` for ``torch.utils.checkpoint``: (forward context, recomputation context)."""
    return _set_mode(RECORD), _set_mode(REPLAY)


def checkpointed(function: Any, *args: Any) -> Any:
    """``function(*args)``, recomputed in backward (non-reentrant checkpoint with the contexts above)."""
    return checkpoint(function, *args, use_reentrant=False, context_fn=recompute_contexts)


def should_checkpoint(module: torch.nn.Module) -> bool:
    """Only a training forward that will be backpropagated is worth checkpointing (and must be:
    otherwise a recorded forward would never be replayed)."""
    return module.training and torch.is_grad_enabled() and any(p.requires_grad for p in module.parameters())
