"""The training step on CUDA: MegDet's 2 x 1 == 1 x 2 with CGBN on the GPU, and checkpoint-restart.

Skipped only where CUDA is absent.  Marked ``coco`` too: they need pycocotools for the loader (the GPU
machine may lack it; ``bench/gpu.sh`` installs it from a wheel folder or deselects these).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from launchers import run

pytestmark = [pytest.mark.gpu, pytest.mark.coco]
TRAIN = ["-m", "megdet_hpc.train"]
GPU = {"train": {"device": "cuda", "deterministic": True, "checkpoint_period": 1, "eval_at_end": False}}


def test_two_ranks_one_image_equals_one_rank_two_images_on_cuda(tiny_config, tmp_path: Path) -> None:
    """fp32, deterministic cuDNN, CGBN over 2 ranks sharing the GPU (torch gloo carries CUDA tensors)."""
    common = {"solver": {"max_iter": 1, "warmup_iters": 0, "base_lr": 0.02, "amp": "off"}, **GPU}
    two = tiny_config("two.yaml", data={"images_per_gpu": 1}, **common)
    one = tiny_config("one.yaml", data={"images_per_gpu": 2}, **common)
    transport = {
        "MEGDET_COMM": "torch",
        "MEGDET_TORCH_BACKEND": "nccl" if torch.cuda.device_count() >= 2 else "gloo",
    }
    run("torchrun", 2, [*TRAIN, "--config", str(two), f"train.output_dir={tmp_path}/two"], env=transport)
    run("single", 1, [*TRAIN, "--config", str(one), f"train.output_dir={tmp_path}/one"])
    a = torch.load(tmp_path / "two/model_0000001.pth", weights_only=True)["model"]
    b = torch.load(tmp_path / "one/model_0000001.pth", weights_only=True)["model"]
    worst = max((a[k].double() - b[k].double()).abs().max().item() for k in a if a[k].is_floating_point())
    assert worst <= 1e-4, worst


def test_checkpoint_written_and_resumed_on_cuda(tiny_config) -> None:
    """The CUDA RNG state, model, optimizer and scaler come back exactly; training continues."""
    from megdet_hpc.checkpoint import load_file
    from megdet_hpc.config import load_config
    from megdet_hpc.distributed.single import SingleProcessComm
    from megdet_hpc.engine import build_run

    cfg = load_config(tiny_config(solver={"max_iter": 2, "amp": "fp16"}, **GPU))
    first = build_run(cfg, SingleProcessComm(), resume=False)
    assert first.train() == 0
    first.close()
    saved = load_file(Path(cfg.train.output_dir) / "model_0000002.pth")
    assert "cuda" in saved["rng"][0] and saved["scaler"]

    more = load_config(tiny_config("more.yaml", solver={"max_iter": 3, "amp": "fp16"}, **GPU))
    run = build_run(more, SingleProcessComm())
    resumed = run.trainer
    assert run.resumed_from is not None and resumed.iteration == 2
    state = bytes(torch.cuda.get_rng_state().cpu().numpy().tobytes())
    assert state == saved["rng"][0]["cuda"][torch.cuda.current_device()]
    for name, tensor in resumed.model.state_dict().items():
        assert torch.equal(tensor.cpu(), saved["model"][name]), name
    assert resumed.scaler.state_dict()["scale"] == saved["scaler"]["scale"]
    assert run.train() == 0 and resumed.iteration == 3
    run.close()
