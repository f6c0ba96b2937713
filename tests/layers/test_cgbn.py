"""CGBN equals nn.BatchNorm2d on the concatenated batch: real processes for every backend."""

from __future__ import annotations

import pytest
import torch
from launchers import collect
from torch import nn

from megdet_hpc.layers import CrossGPUBatchNorm2d, convert_to_cgbn, count_cgbn

WORKER = "tests/layers/cgbn_worker.py"
C = 8
TOL = 1e-5
# Low-precision inputs are compared against the float64 reference within their own rounding.
TOL_BY_CASE = {"bf16": 0.05, "fp16": 0.01}


# Every launcher at 4 ranks (uneven shards, BN groups of 2); 2 ranks under the two that differ most
# (Horovod over gloo, MPI) -- each run costs every rank a torch import.
RUNS = [("hvd-gloo", 2), ("hvd-gloo", 4), ("hvd-mpi", 4), ("mpirun", 2), ("mpirun", 4), ("torchrun", 4)]


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, int], list[dict]]:
    """Run the worker once per (launcher, N) of ``RUNS`` and collect every rank's report."""
    out: dict[tuple[str, int], list[dict]] = {}
    for launcher, nproc in RUNS:
        # Horovod itself carries the statistics here (MEGDET_CGBN_COMM=main), not mpi4py.
        out[(launcher, nproc)] = collect(
            launcher, nproc, [WORKER], env={"MEGDET_CGBN_COMM": "main"}, timeout=240
        )
        assert len(out[(launcher, nproc)]) == nproc
    return out


CASES = ["equal", "uneven", "offset", "two_pass", "channels_last", "bf16", "fp16", "group2"]


@pytest.mark.parametrize(("launcher", "nproc"), RUNS)
def test_cgbn_matches_full_batch_bn(results, launcher: str, nproc: int) -> None:
    reports = results[(launcher, nproc)]
    expected_backend = {"hvd-gloo": "horovod", "hvd-mpi": "horovod", "mpirun": "mpi", "torchrun": "torch"}
    for rep in reports:
        assert rep["backend"] == expected_backend[launcher] and rep["world"] == nproc
        assert rep["compiled_graphs"] == 0  # the default kernels compile nothing
        for case in CASES:
            if case == "group2" and nproc != 4:
                continue
            err = rep[case]
            tol = TOL_BY_CASE.get(case, TOL)
            for key in ("y", "grad_x", "grad_w", "grad_b"):
                assert err[key] <= tol * (10 if key != "y" and case in TOL_BY_CASE else 1), (case, key, err)
            # Statistics are float32 whatever the input dtype; running_mean is ~1e3 in the offset
            # case, where float32 storage itself rounds by 3e-5, so that case is held to 1e-5 relative.
            scale = 1e3 if case == "offset" else 1.0
            assert err["running_mean"] <= TOL * scale and err["running_var"] <= TOL, (case, err)
            assert err["same_buffers"], case
        assert reports[0]["bf16"]["out_dtype"] == "torch.bfloat16"
        assert rep["fp16"]["out_dtype"] == "torch.float16"
        assert rep["channels_last"]["channels_last"]
        assert rep["eval_collectives"] == 0
        assert "must divide the world size" in rep["bad_group_error"]


def test_compiled_kernels_across_two_ranks() -> None:
    """``kernels="compiled"`` with real collectives (torchrun, gloo): an even batch and an uneven one
    with an empty rank (which runs the compiled kernels too, so the buffers stay bit-identical); the
    same payloads as the eager layer.  Two cases only: every new shape class is a compilation."""
    env = {"MEGDET_CGBN_COMM": "main", "MEGDET_TEST_KERNELS": "compiled", "MEGDET_TEST_CASES": "equal,uneven"}
    reports = collect("torchrun", 2, [WORKER], env=env, timeout=300)
    assert len(reports) == 2
    for rep in reports:
        assert rep["compiled_graphs"] > 0 and "offset" not in rep
        for case in ("equal", "uneven"):
            err = rep[case]
            for key in ("y", "grad_x", "grad_w", "grad_b", "running_mean", "running_var"):
                assert err[key] <= TOL, (case, key, err)
            assert err["same_buffers"], case
            assert err["fwd_collectives"] == [["allreduce", 2 * C + 1, "torch.float64"]]
            assert err["bwd_collectives"] == [["allreduce", 2 * C, "torch.float32"]]


@pytest.mark.parametrize("launcher", ["hvd-gloo", "mpirun", "torchrun"])
def test_one_collective_each_way_with_fixed_payload(results, launcher: str) -> None:
    """Forward: exactly one allreduce of 2C+1; backward: exactly one allreduce of 2C; any N."""
    for nproc in [n for name, n in RUNS if name == launcher]:
        for rep in results[(launcher, nproc)]:
            for case in ("equal", "uneven", "offset"):
                assert rep[case]["fwd_collectives"] == [["allreduce", 2 * C + 1, "torch.float64"]]
                assert rep[case]["bwd_collectives"] == [["allreduce", 2 * C, "torch.float32"]]
            assert [e[:2] for e in rep["two_pass"]["fwd_collectives"]] == [
                ["allreduce", C + 1],
                ["allreduce", C],
            ]


def test_single_process_is_plain_batchnorm() -> None:
    torch.manual_seed(0)
    bn = nn.BatchNorm2d(C)
    cg = CrossGPUBatchNorm2d(C)
    cg.load_state_dict(bn.state_dict())
    x = torch.randn(4, C, 6, 6)
    assert torch.equal(bn(x), cg(x))
    assert torch.equal(bn.running_var, cg.running_var)
    assert set(bn.state_dict()) == set(cg.state_dict())


def test_channel_mismatch_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="has 8 channels but the input has 3"):
        CrossGPUBatchNorm2d(C)(torch.randn(2, 3, 4, 4))


def test_negative_group_size_rejected() -> None:
    with pytest.raises(ValueError, match="group_size"):
        CrossGPUBatchNorm2d(C, group_size=-2)


def test_converter_swaps_bn_and_frozen_bn_and_keeps_values() -> None:
    from torchvision.ops.misc import FrozenBatchNorm2d

    model = nn.Sequential(nn.Conv2d(3, C, 3), nn.BatchNorm2d(C), nn.ReLU(), FrozenBatchNorm2d(C))
    with torch.no_grad():
        model[1].running_mean.uniform_()
        model[3].weight.uniform_()
    model.eval()
    x = torch.randn(2, 3, 8, 8)
    before = model(x)
    converted = convert_to_cgbn(model, group_size=2, convert_frozen=True)
    assert count_cgbn(converted) == 2
    assert converted[1].group_size == 2
    assert torch.allclose(before, converted(x), atol=1e-6)
    assert convert_to_cgbn(nn.Sequential(FrozenBatchNorm2d(C)))[0].__class__ is FrozenBatchNorm2d


def test_module_pickles_without_comm_handles() -> None:
    import copy

    layer = CrossGPUBatchNorm2d(C)
    layer(torch.randn(2, C, 3, 3))
    clone = copy.deepcopy(layer)
    assert clone._comm is None and torch.equal(clone.running_mean, layer.running_mean)


@pytest.mark.parametrize("momentum", [0.1, None])
def test_forced_path_in_one_process_matches_float64_bn(momentum: float | None) -> None:
    """The statistics path itself (what force_sync benchmarks), ill-conditioned inputs included."""
    from megdet_hpc.distributed.single import SingleProcessComm

    for offset in (0.0, 1e4):
        gen = torch.Generator().manual_seed(3)
        x64 = (torch.randn(4, C, 5, 6, generator=gen, dtype=torch.float64) * 2 + offset).float().double()
        g64 = torch.randn(x64.shape, generator=gen, dtype=torch.float64)  # x64: exactly the float32 input
        layer = CrossGPUBatchNorm2d(C, momentum=momentum, comm=SingleProcessComm(), force_sync=True)
        ref = nn.BatchNorm2d(C, momentum=momentum).double()
        for _ in range(3):  # running statistics over several steps (momentum None: cumulative average)
            x = x64.float().requires_grad_(True)
            xr = x64.clone().requires_grad_(True)
            y, yr = layer(x), ref(xr)
            (y.double() * g64).sum().backward()
            (yr * g64).sum().backward()
        assert (y.double() - yr).abs().max() < 1e-5
        assert (x.grad.double() - xr.grad).abs().max() < 1e-5
        assert (layer.running_var.double() - ref.running_var).abs().max() < 1e-5
        assert (layer.running_mean.double() - ref.running_mean).abs().max() < 1e-5 * (1 + offset / 10)
        assert int(layer.num_batches_tracked) == 3


def test_kernels_argument_is_checked() -> None:
    with pytest.raises(ValueError, match="kernels must be one of"):
        CrossGPUBatchNorm2d(C, kernels="fast")
