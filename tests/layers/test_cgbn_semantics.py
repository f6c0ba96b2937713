"""CGBN is nn.BatchNorm2d in every mode and dtype, and exact whatever its statistics kernel accumulates in.

In one process with ``force_sync=True`` the whole statistics path runs (payload, collective, group
moments, the shifted frame), so these in-process tests cover the arithmetic the multi-rank tests
(``test_cgbn.py``) check across launchers.  Adapted from the cases of torch's, Horovod's and apex's own
SyncBatchNorm tests: fp64, converted half models, eval without buffers, the flag flipped at run time.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from megdet_hpc.distributed.single import SingleProcessComm
from megdet_hpc.layers import CrossGPUBatchNorm2d, convert_to_cgbn

C = 6


def float32_welford(x: torch.Tensor, *_: object) -> tuple[torch.Tensor, torch.Tensor]:
    """``batch_norm_update_stats`` as CUDA computes it for float32 input: per channel, 32 threads each
    run a float32 Welford over a strided slice, then the partials merge pairwise (Chan) in float32."""
    c = x.shape[1]
    flat = x.detach().float().transpose(0, 1).reshape(c, -1)
    threads = 32
    pad = (-flat.shape[1]) % threads
    cols = flat.shape[1] // threads + (1 if pad else 0)
    grid = torch.cat([flat, torch.full((c, pad), float("nan"))], 1).view(c, cols, threads)
    mean = torch.zeros(c, threads)
    m2 = torch.zeros(c, threads)
    count = torch.zeros(c, threads)
    for j in range(cols):
        v = grid[:, j, :]
        valid = ~v.isnan()
        n1 = count + valid.float()
        delta = torch.where(valid, v - mean, torch.zeros(()))
        mean = mean + torch.where(valid, delta / n1.clamp(min=1), torch.zeros(()))
        m2 = m2 + torch.where(valid, delta * (v - mean), torch.zeros(()))
        count = n1
    while mean.shape[1] > 1:  # tree merge of the threads' partials
        half = mean.shape[1] // 2
        na, nb = count[:, :half], count[:, half:]
        n = na + nb
        delta = mean[:, half:] - mean[:, :half]
        mean = mean[:, :half] + delta * (nb / n.clamp(min=1))
        m2 = m2[:, :half] + m2[:, half:] + delta * delta * (na * nb / n.clamp(min=1))
        count = n
    return mean[:, 0], m2[:, 0] / count[:, 0]


def _pair(momentum: float | None = 0.1, dtype: torch.dtype = torch.float32, **kwargs: object):
    cg = CrossGPUBatchNorm2d(C, momentum=momentum, comm=SingleProcessComm(), force_sync=True, **kwargs)
    ref = nn.BatchNorm2d(C, momentum=momentum, **kwargs)  # type: ignore[arg-type]
    torch.manual_seed(0)
    with torch.no_grad():
        if ref.affine:
            ref.weight.uniform_(0.5, 1.5)
            ref.bias.uniform_(-1, 1)
    cg.load_state_dict(ref.state_dict())
    return cg.to(dtype), ref.double()


def _batch(offset: float = 0.0, dtype: torch.dtype = torch.float32, seed: int = 3):
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(4, C, 5, 7, generator=gen, dtype=torch.float64) * 2 + offset).to(dtype)
    g = torch.randn(x.shape, generator=gen, dtype=torch.float64)
    return x, g


def _run(layer: nn.Module, x: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x = x.clone().requires_grad_(True)
    y = layer(x)
    (y.double() * g).sum().backward()
    return y.detach(), x.grad


def test_offset_1e4_exact_with_cuda_float32_statistics(monkeypatch: pytest.MonkeyPatch) -> None:
    """The statistics kernel swapped for an emulation of CUDA's float32 Welford: still within 1e-5."""
    x, g = _batch(offset=1e4)
    direct_mean, direct_var = float32_welford(x)
    exact_var = x.double().var(dim=(0, 2, 3), unbiased=False)
    assert ((direct_var.double() - exact_var).abs() / exact_var).max() > 1e-5  # the emulation is lossy
    monkeypatch.setattr(torch, "batch_norm_update_stats", float32_welford)
    cg, ref = _pair()
    y, gx = _run(cg, x, g)
    yr, gxr = _run(ref, x.double(), g)
    assert (y.double() - yr).abs().max() < 1e-5
    assert (gx.double() - gxr).abs().max() < 1e-5
    assert (cg.weight.grad.double() - ref.weight.grad).abs().max() < 1e-5
    assert ((cg.running_var.double() - ref.running_var) / ref.running_var).abs().max() < 1e-5
    assert ((cg.running_mean.double() - ref.running_mean) / ref.running_mean).abs().max() < 1e-6


def test_float64_layer_computes_in_float64() -> None:
    cg, ref = _pair(dtype=torch.float64)
    x, g = _batch(dtype=torch.float64)
    for _ in range(2):
        y, gx = _run(cg, x, g)
        yr, gxr = _run(ref, x, g)
    assert y.dtype == torch.float64 and cg.running_var.dtype == torch.float64
    assert (y - yr).abs().max() < 1e-12 and (gx - gxr).abs().max() < 1e-12
    assert (cg.running_var - ref.running_var).abs().max() < 1e-12


@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("track", [True, False])
def test_training_modes_match_batchnorm(momentum: float | None, affine: bool, track: bool) -> None:
    cg, ref = _pair(momentum, affine=affine, track_running_stats=track)
    for seed in range(3):
        x, g = _batch(seed=seed)
        y, gx = _run(cg, x, g)
        yr, gxr = _run(ref, x.double(), g)
        assert (y.double() - yr).abs().max() < 1e-5 and (gx.double() - gxr).abs().max() < 1e-5
    if track:
        assert (cg.running_var.double() - ref.running_var).abs().max() < 1e-5
        assert int(cg.num_batches_tracked) == 3
    if affine:
        assert (cg.bias.grad.double() - ref.bias.grad).abs().max() < 1e-5


class _MustNotCommunicate(SingleProcessComm):
    """A two-rank world whose collectives fail: the layer must not issue any (a peer would hang)."""

    @property
    def size(self) -> int:
        return 2

    def _allreduce_(self, tensor, group, name=None):  # type: ignore[no-untyped-def]
        raise AssertionError(f"collective issued: {name}")


def test_eval_without_buffers_uses_local_batch_statistics_and_no_collective() -> None:
    cg = CrossGPUBatchNorm2d(C, track_running_stats=False, comm=_MustNotCommunicate()).eval()
    ref = nn.BatchNorm2d(C, track_running_stats=False).eval()
    x, _ = _batch()
    assert torch.allclose(cg(x), ref(x), atol=1e-6)


def test_flag_flipped_on_a_layer_with_buffers_follows_batchnorm() -> None:
    cg, ref = _pair()
    with torch.no_grad():
        ref.running_mean.uniform_(-1, 1)
        ref.running_var.uniform_(0.5, 2)
    cg.load_state_dict(ref.state_dict())
    cg.track_running_stats = ref.track_running_stats = False
    x, g = _batch()
    cg.eval()
    ref.eval()
    assert torch.allclose(cg(x).double(), ref(x.double()), atol=1e-6)  # eval: the buffers
    cg.train()
    ref.train()
    before = cg.running_mean.clone()
    y, _ = _run(cg, x, g)
    yr, _ = _run(ref, x.double(), g)
    assert (y.double() - yr).abs().max() < 1e-5 and torch.equal(cg.running_mean, before)


def _ulps(value: torch.Tensor, reference: torch.Tensor, dtype: torch.dtype) -> float:
    ulp = torch.finfo(dtype).eps * reference.abs().clamp(min=torch.finfo(dtype).tiny)
    return float(((value.double() - reference) / ulp.double()).abs().max())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_input_gradients_as_close_as_mixed_precision_batchnorm(dtype: torch.dtype) -> None:
    """Half input, float32 parameters (an AMP step): errors within those of nn.BatchNorm2d itself."""
    x, g = _batch(dtype=dtype)
    cg = CrossGPUBatchNorm2d(C, comm=SingleProcessComm(), force_sync=True)
    bn = nn.BatchNorm2d(C)
    ref = nn.BatchNorm2d(C).double()
    y, gx = _run(cg, x, g.to(dtype).double())
    yb, gxb = _run(bn, x, g.to(dtype).double())
    yr, gxr = _run(ref, x.double(), g.to(dtype).double())
    assert y.dtype == dtype and gx.dtype == dtype
    assert _ulps(y, yr, dtype) <= _ulps(yb, yr, dtype) + 1
    assert _ulps(gx, gxr, dtype) <= max(2 * _ulps(gxb, gxr, dtype), 2)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_convert_keeps_the_modules_own_tensors(dtype: torch.dtype) -> None:
    model = nn.Sequential(nn.Conv2d(3, C, 3), nn.BatchNorm2d(C), nn.BatchNorm2d(C, affine=False)).to(dtype)
    weight, running = model[1].weight, model[2].running_mean
    converted = convert_to_cgbn(model)
    assert converted[1].weight is weight and converted[2].running_mean is running
    for layer in converted[1:]:
        assert all(t.dtype == dtype for t in layer.state_dict().values() if t.is_floating_point())
