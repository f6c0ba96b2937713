"""RNG state capture and restore (python, numpy, torch CPU, CUDA) as plain Python data.

Plain data (ints, bytes, lists) because the states travel through ``Comm.allgather_object`` (pickled
by Horovod/mpi4py/torch) and into checkpoints read with ``weights_only=True``.

CUDA: only *this rank's* device generator (``torch.cuda.current_device()``, the one the trainer set)
is saved, under ``cuda_device``.  Every rank draws on its own device only, and a resume may see fewer
GPUs (a smaller node, ``CUDA_VISIBLE_DEVICES`` narrowed to one per task by Slurm): restoring a list of
every visible device's state then indexed devices that do not exist.  Old checkpoints (``cuda``: one
state per device then visible) restore the entry of the current device when it exists, else none.
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch


def _tensor_bytes(t: torch.Tensor) -> bytes:
    return bytes(t.cpu().numpy().tobytes())


def _bytes_tensor(b: bytes) -> torch.Tensor:
    return torch.frombuffer(bytearray(b), dtype=torch.uint8)


def capture() -> dict[str, Any]:
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": [str(kind), keys.astype(np.uint32).tobytes(), int(pos), int(has_gauss), float(cached)],
        "torch": _tensor_bytes(torch.get_rng_state()),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda_device"] = _tensor_bytes(torch.cuda.get_rng_state(torch.cuda.current_device()))
    return state


def restore(state: dict[str, Any]) -> None:
    random.setstate(_to_tuple(state["python"]))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.frombuffer(keys, dtype=np.uint32).copy(), pos, has_gauss, cached))
    torch.set_rng_state(_bytes_tensor(state["torch"]))
    if not torch.cuda.is_available():
        return
    device = torch.cuda.current_device()
    own = state.get("cuda_device")
    if own is None and device < len(state.get("cuda", ())):  # a checkpoint from before cuda_device
        own = state["cuda"][device]
    if own is not None:
        torch.cuda.set_rng_state(_bytes_tensor(own), device)


def _to_tuple(x: Any) -> Any:
    return tuple(_to_tuple(v) for v in x) if isinstance(x, (list, tuple)) else x


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
