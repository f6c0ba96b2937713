"""Activation checkpointing that is safe for layers with side effects (CGBN).

``torch.utils.checkpoint`` runs a segment's forward twice: once normally and once in backward to
regenerate the tensors it did not keep.  A CGBN layer's forward has side effects: it issues a
collective and updates its running statistics.  Run twice, it would update the statistics twice and
-- worse -- issue an extra collective in backward on some ranks and not others.  So the two passes
run under two contexts (``checkpoint(..., context_fn=recompute_contexts)``): while *recording*, a
CGBN layer computes its group statistics as usual and also saves them in the checkpoint call's store;
while *replaying*, it reads them back from there instead -- no collective, no running-statistics
update, the same numbers.
"""

from __future__ import annotations

import threading
from typing import Any

import torch
from torch.utils.checkpoint import checkpoint

RECORD = "record"
REPLAY = "replay"


class _Mode(threading.local):
    value: str | None = None
    store: _Store | None = None


class _Store:
    """What one checkpoint call's forward recorded, per layer, in call order; its recomputations read it
    back in the same order.  One store per checkpoint call (not per layer), so a layer used in two
    checkpointed segments replays each segment's own statistics, a forward that is never
    backpropagated leaves nothing behind for the next one, and a second backward (retain_graph)
    replays again from the start."""

    def __init__(self) -> None:
        self.recorded: dict[object, list[Any]] = {}
        self.cursor: dict[object, int] = {}


_mode = _Mode()


def current_mode() -> str | None:
    """``"record"`` in a checkpointed forward, ``"replay"`` in its recomputation, else None."""
    return _mode.value


def save(layer: object, value: Any) -> None:
    """While recording: keep ``value`` for ``layer``'s recomputation."""
    assert _mode.store is not None and _mode.value == RECORD
    _mode.store.recorded.setdefault(layer, []).append(value)


def load(layer: object) -> Any:
    """While replaying: what ``layer`` saved at the same point of the recorded forward."""
    store = _mode.store
    assert store is not None and _mode.value == REPLAY
    index = store.cursor.get(layer, 0)
    store.cursor[layer] = index + 1
    return store.recorded[layer][index]


class _Context:
    """Sets the mode and the call's store; re-enterable (torch enters the recomputation context anew
    for each recomputation of the same call)."""

    def __init__(self, value: str, store: _Store) -> None:
        self.value, self.store = value, store
        self._previous: list[tuple[str | None, _Store | None]] = []

    def __enter__(self) -> None:
        self._previous.append((_mode.value, _mode.store))
        _mode.value, _mode.store = self.value, self.store
        if self.value == REPLAY:
            self.store.cursor.clear()

    def __exit__(self, *exc: object) -> None:
        _mode.value, _mode.store = self._previous.pop()


def recompute_contexts() -> tuple[_Context, _Context]:
    """``context_fn`` for ``torch.utils.checkpoint``: (forward context, recomputation context), sharing
    one store for this checkpoint call."""
    store = _Store()
    return _Context(RECORD, store), _Context(REPLAY, store)


def checkpointed(function: Any, *args: Any) -> Any:
    """``function(*args)``, recomputed in backward (non-reentrant checkpoint with the contexts above)."""
    return checkpoint(function, *args, use_reentrant=False, context_fn=recompute_contexts)


def should_checkpoint(module: torch.nn.Module) -> bool:
    """Only a training forward that will be backpropagated is worth checkpointing (and must be:
    otherwise a recorded forward would never be replayed)."""
    return module.training and torch.is_grad_enabled() and any(p.requires_grad for p in module.parameters())
