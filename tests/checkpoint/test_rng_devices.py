"""CUDA RNG state in checkpoints: this rank's device only, so a resume with fewer visible GPUs works.

There is no GPU here, so ``torch.cuda``'s generator API is replaced by ``FakeDevices``: N devices, one
generator state each, and the real driver's refusal of a device ordinal that does not exist.  That
refusal is exactly what a resume on a node with fewer GPUs hit.
"""

from __future__ import annotations

import pytest
import torch

from megdet_hpc.checkpoint import rng


class FakeDevices:
    def __init__(self, count: int, current: int = 0) -> None:
        self.count, self.current = count, current
        self.states = {i: torch.full((16,), i, dtype=torch.uint8) for i in range(count)}

    def _check(self, device: int | str | torch.device) -> int:
        if isinstance(device, int):
            index = device
        else:
            index = torch.device(device).index
            index = self.current if index is None else index
        if index >= self.count:
            raise RuntimeError("CUDA error: invalid device ordinal")
        return index

    def get_rng_state(self, device: int | str | torch.device = "cuda") -> torch.Tensor:
        return self.states[self._check(device)].clone()

    def set_rng_state(self, state: torch.Tensor, device: int | str | torch.device = "cuda") -> None:
        self.states[self._check(device)] = state.clone()

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        for module in (torch.cuda, torch.cuda.random):
            for name, value in {
                "is_available": lambda: True,
                "is_initialized": lambda: True,
                "device_count": lambda: self.count,
                "current_device": lambda: self.current,
                "get_rng_state": self.get_rng_state,
                "set_rng_state": self.set_rng_state,
            }.items():
                monkeypatch.setattr(module, name, value, raising=False)


def test_resume_on_fewer_gpus_restores_this_ranks_generator(monkeypatch: pytest.MonkeyPatch) -> None:
    node = FakeDevices(count=4, current=1)  # rank with local rank 1 on a 4-GPU node
    node.states[1] = torch.full((16,), 77, dtype=torch.uint8)
    node.install(monkeypatch)
    saved = rng.capture()
    assert "cuda" not in saved  # no list of every visible device's state any more

    smaller = FakeDevices(count=1, current=0)  # the resume: one GPU visible (CUDA_VISIBLE_DEVICES=1)
    smaller.install(monkeypatch)
    rng.restore(saved)
    assert torch.equal(smaller.states[0], torch.full((16,), 77, dtype=torch.uint8))


def test_old_checkpoint_with_every_devices_state_still_loads(monkeypatch: pytest.MonkeyPatch) -> None:
    old = rng.capture()  # CPU-only capture, then the pre-fix "cuda" list of a 4-GPU node
    old["cuda"] = [bytes([i]) * 16 for i in range(4)]
    one = FakeDevices(count=1, current=0)
    one.install(monkeypatch)
    rng.restore(old)  # device 0 gets device 0's old state; devices 1-3 no longer exist
    assert torch.equal(one.states[0], torch.zeros(16, dtype=torch.uint8))
    two = FakeDevices(count=2, current=1)
    two.install(monkeypatch)
    rng.restore(old)
    assert torch.equal(two.states[1], torch.ones(16, dtype=torch.uint8))
