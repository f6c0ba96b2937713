"""CGBN's CUDA path on fake CUDA tensors (no GPU needed): every commit checks that the forward and
backward of both kernel sets keep every tensor on the GPU and never read a device value on the host.

A CPU tensor meeting a CUDA one raises ``FakeTensorDeviceMismatchError``; a host synchronisation
(``.item()``, ``bool(tensor)``, ``nonzero``) raises ``DataDependentOutputException``.
"""

from __future__ import annotations

import pytest
import torch
from fake_cuda import backward, fake_cuda
from torch._subclasses.fake_tensor import DataDependentOutputException

from megdet_hpc.distributed.single import SingleProcessComm
from megdet_hpc.layers import CrossGPUBatchNorm2d

C = 8


@pytest.mark.parametrize("kernels", ["portable", "fused"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("momentum", [0.1, None])
def test_forward_backward_stay_on_the_gpu_without_host_syncs(
    kernels: str, dtype: torch.dtype, layout: str, momentum: float | None
) -> None:
    with fake_cuda(), torch.device("cuda"):
        layer = CrossGPUBatchNorm2d(
            C,
            momentum=momentum,
            comm=SingleProcessComm(),
            force_sync=True,
            kernels=kernels,
            dtype=torch.float64 if dtype == torch.float64 else None,
        )
        x = torch.randn(2, C, 5, 4, device="cuda").to(dtype)
        if layout == "channels_last":
            x = x.contiguous(memory_format=torch.channels_last)
        x.requires_grad_(True)
        for _ in range(2):  # the second call reuses the layer's buffers
            y = layer(x)
            backward([y], [torch.ones_like(y)])
        assert y.device.type == "cuda" and y.dtype == dtype
        assert y.is_contiguous(memory_format=torch.channels_last) == (layout == "channels_last")
        assert x.grad.device.type == "cuda" and x.grad.dtype == dtype
        for t in (layer.weight.grad, layer.bias.grad, layer.running_mean, layer.running_var):
            assert t.device.type == "cuda"
        assert layer.num_batches_tracked.device.type == "cuda"


def test_empty_shard_joins_without_host_syncs() -> None:
    with fake_cuda(), torch.device("cuda"):
        layer = CrossGPUBatchNorm2d(C, comm=SingleProcessComm(), force_sync=True)
        x = torch.randn(0, C, 5, 4, device="cuda", requires_grad=True)
        y = layer(x)
        backward([y], [torch.ones_like(y)])
        assert layer.running_mean.device.type == "cuda"


def test_fake_mode_catches_what_it_should() -> None:
    """The harness itself: a host read and a CPU/GPU mix both fail (else the tests above prove nothing)."""
    with fake_cuda():
        with pytest.raises(DataDependentOutputException):
            bool(torch.randn(3, device="cuda").sum() > 0)
        with pytest.raises(RuntimeError, match="[Dd]evice"):
            torch.randn(3, device="cuda") + torch.randn(3, device="cpu")
