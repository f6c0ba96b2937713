"""CGBN with ``kernels="compiled"`` (torch.compile of the per-channel arithmetic), in one process on CPU.

Inductor's CPU reductions accumulate float32 in float32, like CUDA's statistics kernel, so the
1e4-offset case here checks the shifted frame against a float32 accumulator without any emulation.
Every graph is compiled once in this module (~30 s cold); the dtype and layout cases share them.
"""

from __future__ import annotations

from collections import Counter

import pytest
import torch
import torch._dynamo
from torch import nn
from torch.profiler import ProfilerActivity, profile

from megdet_hpc.config import ConfigError, load_config
from megdet_hpc.distributed.single import SingleProcessComm
from megdet_hpc.layers import CrossGPUBatchNorm2d, cgbn_compiled
from megdet_hpc.layers import cgbn as cgbn_module
from megdet_hpc.layers.recompute import checkpointed

C = 6
HOST_SYNCS = {"aten::item", "aten::is_nonzero", "aten::_local_scalar_dense"}


def _pair(momentum: float | None = 0.1, affine: bool = True) -> tuple[CrossGPUBatchNorm2d, nn.BatchNorm2d]:
    cg = CrossGPUBatchNorm2d(
        C, momentum=momentum, affine=affine, comm=SingleProcessComm(), force_sync=True, kernels="compiled"
    )
    ref = nn.BatchNorm2d(C, momentum=momentum, affine=affine)
    torch.manual_seed(0)
    if affine:
        with torch.no_grad():
            ref.weight.uniform_(0.5, 1.5)
            ref.bias.uniform_(-1, 1)
    cg.load_state_dict(ref.state_dict())
    return cg, ref.double()


def _batch(offset: float = 0.0, shape: tuple[int, ...] = (4, C, 5, 7)) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(3)
    x = (torch.randn(shape, generator=gen, dtype=torch.float64) * 2 + offset).float()
    return x, torch.randn(shape, generator=gen, dtype=torch.float64)


def _run(layer: nn.Module, x: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x = x.clone().requires_grad_(True)
    y = layer(x)
    (y.double() * g).sum().backward()
    return y.detach(), x.grad


@pytest.mark.parametrize("offset", [0.0, 1e4])
def test_compiled_layer_matches_float64_batchnorm(offset: float) -> None:
    cg, ref = _pair()
    x, g = _batch(offset)
    for _ in range(2):  # the running statistics over two steps
        y, gx = _run(cg, x, g)
        yr, gxr = _run(ref, x.double(), g)
    assert cg._ws is None, "the compiled path took the eager one"
    assert (y.double() - yr).abs().max() < 1e-5
    assert (gx.double() - gxr).abs().max() < 1e-5
    assert (cg.weight.grad.double() - ref.weight.grad).abs().max() < 1e-4
    assert (cg.bias.grad.double() - ref.bias.grad).abs().max() < 1e-4
    assert ((cg.running_var.double() - ref.running_var) / ref.running_var).abs().max() < 1e-5
    scale = max(1.0, offset)
    assert (cg.running_mean.double() - ref.running_mean).abs().max() < 1e-6 * scale
    assert torch.equal(cg.num_batches_tracked, ref.num_batches_tracked)


def test_non_affine_untracked_and_channels_last() -> None:
    cg, ref = _pair(affine=False)
    cg.track_running_stats = ref.track_running_stats = False
    x, g = _batch()
    x = x.contiguous(memory_format=torch.channels_last)
    y, gx = _run(cg, x, g)
    yr, gxr = _run(ref, x.double(), g)
    assert y.is_contiguous(memory_format=torch.channels_last)
    assert (y.double() - yr).abs().max() < 1e-5 and (gx.double() - gxr).abs().max() < 1e-5


def test_a_compiled_and_an_eager_rank_can_share_a_group() -> None:
    """Both payloads are ``[n m, n (v + m^2), n]`` in float64: their sum (what the allreduce forms)
    gives the statistics of the two shards together."""
    x1, _ = _batch(offset=300.0)
    x2 = _batch(offset=290.0, shape=(2, C, 3, 4))[0]
    _, compiled, _ = cgbn_compiled.kernel("shard_sums")(x1)
    ws = cgbn_module._Workspace(C, x2.device, torch.float32)
    d, shift, moments = cgbn_module._shard(x2)
    cgbn_module._sync_statistics(d, shift, moments, ws, SingleProcessComm(), None, None)
    assert compiled.dtype == ws.payload.dtype == torch.float64 and compiled.shape == ws.payload.shape
    total = compiled + ws.payload
    n = total[2 * C]
    mean, var = total[:C] / n, total[C : 2 * C] / n - (total[:C] / n) ** 2
    both = torch.cat([x.double().transpose(0, 1).reshape(C, -1) for x in (x1, x2)], dim=1)
    assert n == both.shape[1]
    torch.testing.assert_close(mean, both.mean(1), rtol=1e-7, atol=0)  # eager: a float32 mean
    torch.testing.assert_close(var, both.var(1, unbiased=False), rtol=1e-5, atol=0)


def test_half_model_keeps_its_momentum_and_an_empty_shard_joins() -> None:
    """A .half() model's buffers move by momentum 0.1 computed in float32 (not 0.09998, its fp16
    rounding); an empty shard sends zeros and, in a group without data, leaves the buffers alone."""
    cg, ref = _pair()
    cg.half()
    x, g = _batch()
    _run(cg, x.half(), g)
    _run(ref, x.double(), g)
    assert cg.running_mean.dtype == torch.float16
    torch.testing.assert_close(cg.running_var.double(), ref.running_var, rtol=2e-3, atol=0)
    ref_half = ref.running_mean.half().double()  # the reference's own buffer, rounded once
    assert (cg.running_mean.double() - ref_half).abs().max() <= 2 * 2**-11 * ref_half.abs().max()
    empty, _ = _pair()
    before = {k: v.clone() for k, v in empty.state_dict().items()}
    xe = torch.empty(0, C, 5, 7, requires_grad=True)
    y = empty(xe)
    y.sum().backward()
    assert y.shape == xe.shape and xe.grad.shape == xe.shape and empty._ws is None
    for k, v in empty.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert torch.equal(empty.weight.grad, torch.zeros(C))


def test_one_compilation_serves_every_width_and_spatial_size() -> None:
    _run(_pair()[0], *_batch())  # compiled (or already compiled by the tests above)
    before = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    for c, hw in ((8, (3, 9)), (16, (6, 4)), (40, (2, 2))):
        layer = CrossGPUBatchNorm2d(c, comm=SingleProcessComm(), force_sync=True, kernels="compiled")
        x = torch.randn(3, c, *hw, requires_grad=True)
        layer(x).square().sum().backward()
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == before


def test_at_most_twice_batchnorms_ops_and_no_host_sync() -> None:
    """The bench's count (bench/cgbn_ops.py): top-level aten ops, a compiled graph call as one."""

    def ops(layer: nn.Module) -> Counter[str]:
        x, g = torch.randn(2, C, 4, 4), torch.randn(2, C, 4, 4)
        for _ in range(2):
            layer(x.detach().requires_grad_(True)).backward(g)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            layer(x.detach().requires_grad_(True)).backward(g)
        names: Counter[str] = Counter()
        for e in prof.events():
            if e.name.startswith("## Call CompiledFxGraph"):
                names["compiled graph"] += 1
            elif e.name.startswith("aten::") and not (
                e.cpu_parent and e.cpu_parent.name.startswith("aten::")
            ):
                names[e.name] += 1
        return names

    compiled, bn = ops(_pair()[0]), ops(nn.BatchNorm2d(C))
    assert compiled["compiled graph"] == 4, compiled
    assert sum(compiled.values()) <= 2 * sum(bn.values()), (compiled, bn)
    assert not HOST_SYNCS & set(compiled), compiled


def test_checkpointed_replay_gives_the_same_gradients() -> None:
    x, g = _batch()
    grads = []
    for ckpt in (False, True):
        cg, _ = _pair()
        xi = x.clone().requires_grad_(True)
        y = checkpointed(cg, xi) if ckpt else cg(xi)
        (y.double() * g).sum().backward()
        grads.append((xi.grad, cg.weight.grad, cg.running_var.clone(), cg.num_batches_tracked.clone()))
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b)


def test_config_chooses_the_kernels_and_refuses_others(tmp_path) -> None:  # type: ignore[no-untyped-def]
    assert load_config(None, ["model.cgbn_kernels=compiled"]).model.cgbn_kernels == "compiled"
    with pytest.raises(ConfigError, match="cgbn_kernels"):
        load_config(None, ["model.cgbn_kernels=triton"])
    assert set(cgbn_module.KERNELS) == {"auto", "portable", "fused", "compiled"}
