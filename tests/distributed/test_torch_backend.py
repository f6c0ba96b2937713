"""torch.distributed's backend follows the training device, not the machine (issue 16, item 5)."""

from __future__ import annotations

from launchers import collect

from megdet_hpc.distributed.torch_comm import torch_backend


def test_backend_follows_the_training_device() -> None:
    assert torch_backend("cpu", override="") == "gloo"
    assert torch_backend("cuda", override="") == "cpu:gloo,cuda:nccl"  # CPU tensors keep a transport
    assert torch_backend("cuda", override="gloo") == "gloo"  # MEGDET_TORCH_BACKEND wins


def test_cpu_training_on_a_gpu_node_under_torchrun_reduces_cpu_tensors() -> None:
    reps = collect("torchrun", 2, ["tests/distributed/torch_backend_worker.py", "cpu"], timeout=120)
    for rep in reps:
        assert rep["backend"] == "gloo" and rep["device"] == "cpu"
        assert rep["sum"] == [3.0, 3.0, 3.0]
