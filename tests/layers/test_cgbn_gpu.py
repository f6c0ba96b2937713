"""CGBN on CUDA: exact against float64 BN with 2 ranks sharing one GPU, and free of host syncs.

Skipped only where CUDA is absent (``make test-gpu``, ``bash bench/gpu.sh`` run them).  Two ranks share
the GPU over torch gloo, which carries CUDA tensors (NCCL refuses two ranks on one device; with two or
more GPUs NCCL is used).  Every kernel set is covered: the portable native ops, torch's fused SyncBN
kernels (the CUDA default) and ``kernels="compiled"`` (torch.compile: Triton kernels on CUDA).
"""

from __future__ import annotations

import pytest
import torch
from launchers import collect

from megdet_hpc.distributed.single import SingleProcessComm
from megdet_hpc.layers import CrossGPUBatchNorm2d

pytestmark = pytest.mark.gpu
WORKER = "tests/layers/cgbn_worker.py"
C = 8
TOL = 1e-5
TOL_BY_CASE = {"bf16": 0.05, "fp16": 0.01}
CASES = ["equal", "uneven", "offset", "two_pass", "channels_last", "bf16", "fp16"]


def _transport() -> dict[str, str]:
    backend = "nccl" if torch.cuda.device_count() >= 2 else "gloo"
    return {"MEGDET_COMM": "torch", "MEGDET_TORCH_BACKEND": backend}


@pytest.mark.parametrize("kernels", ["portable", "fused", "compiled"])
def test_two_ranks_on_cuda_match_float64_bn(kernels: str) -> None:
    env = {**_transport(), "MEGDET_TEST_DEVICE": "cuda", "MEGDET_TEST_KERNELS": kernels}
    reports = collect("torchrun", 2, [WORKER], env=env, timeout=300)
    assert len(reports) == 2
    for rep in reports:
        assert rep["device"].startswith("cuda")
        for case in CASES:  # uneven = [3, 0]: rank 1 has no image and still joins both collectives
            err = rep[case]
            tol = TOL_BY_CASE.get(case, TOL)
            for key in ("y", "grad_x", "grad_w", "grad_b"):
                assert err[key] <= tol * (10 if key != "y" and case in TOL_BY_CASE else 1), (
                    kernels,
                    case,
                    key,
                    err,
                )
            scale = 1e3 if case == "offset" else 1.0
            assert err["running_mean"] <= TOL * scale and err["running_var"] <= TOL, (kernels, case, err)
            assert err["same_buffers"], case
        assert rep["fp16"]["out_dtype"] == "torch.float16" and rep["bf16"]["out_dtype"] == "torch.bfloat16"
        assert rep["channels_last"]["channels_last"]
        assert rep["equal"]["fwd_collectives"] == [["allreduce", 2 * C + 1, "torch.float64"]]
        assert rep["equal"]["bwd_collectives"] == [["allreduce", 2 * C, "torch.float32"]]
        assert rep["eval_collectives"] == 0


@pytest.mark.parametrize("kernels", ["portable", "fused", "compiled"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_forward_and_backward_never_wait_for_the_gpu(kernels: str, layout: str, dtype: torch.dtype) -> None:
    """No device-to-host synchronisation: count, shifted frame and running statistics stay on the GPU."""
    layer = CrossGPUBatchNorm2d(64, comm=SingleProcessComm(), force_sync=True, kernels=kernels).cuda()
    x = (torch.randn(2, 64, 24, 40, device="cuda") + 1e4).to(dtype)  # far from the origin: the shifted frame
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(20):  # the first call, reused buffers, running-statistics updates
            y = layer(x.detach().requires_grad_(True))
            y.backward(torch.ones_like(y))
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert int(layer.num_batches_tracked) == 20 and torch.isfinite(y.float()).all()


def test_empty_input_on_cuda_joins_and_leaves_running_statistics() -> None:
    layer = CrossGPUBatchNorm2d(4, comm=SingleProcessComm(), force_sync=True).cuda()
    before = layer.running_mean.clone()
    x = torch.zeros(0, 4, 3, 3, device="cuda", requires_grad=True)
    y = layer(x)
    y.sum().backward()
    assert (
        y.shape == x.shape and torch.equal(layer.running_mean, before) and int(layer.num_batches_tracked) == 0
    )


@pytest.mark.parametrize("kernels", ["portable", "fused", "compiled"])
def test_layer_captured_in_a_cuda_graph_replays_like_eager(kernels: str) -> None:
    """Nothing in the layer stops CUDA-graph capture: forward and backward captured
    (``make_graphed_callables``), replayed on new data, equal to the eager layer."""
    import copy

    layer = CrossGPUBatchNorm2d(32, comm=SingleProcessComm(), force_sync=True, kernels=kernels).cuda()
    eager = copy.deepcopy(layer)
    x = torch.randn(2, 32, 16, 24, device="cuda", requires_grad=True)
    graphed = torch.cuda.make_graphed_callables(layer, (x,))
    for seed in range(3):
        gen = torch.Generator(device="cuda").manual_seed(seed)
        data = torch.randn(2, 32, 16, 24, device="cuda", generator=gen) * 3 + 100
        grad = torch.randn(2, 32, 16, 24, device="cuda", generator=gen)
        xg, xe = data.clone().requires_grad_(True), data.clone().requires_grad_(True)
        yg, ye = graphed(xg), eager(xe)
        yg.backward(grad)
        ye.backward(grad)
        assert torch.allclose(yg, ye, atol=1e-5) and torch.allclose(xg.grad, xe.grad, atol=1e-5)
