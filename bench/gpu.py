"""One-GPU benchmark (< 8 minutes): R50-FPN training step with AMP + channels_last, CGBN vs BN at N=1.

Runs from a fresh checkout with only torch/torchvision (Horovod, pycocotools and submitit optional):
``python bench/gpu.py`` or ``bash bench/gpu.sh``.  Reports images/s of the Faster R-CNN R50-FPN step at
2 images/GPU (800 x 1216) in fp32 and AMP + channels_last, fwd+bwd time of the 53 ResNet-50 BN layers
with nn.BatchNorm2d vs CGBN's code path (forced on in a 1-process group), and peak memory.  Writes
bench/results/gpu.json (and $OUT/gpu.json when OUT is set).
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def timed(fn, iters: int, warmup: int = 3) -> float:  # type: ignore[no-untyped-def]
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / iters


def train_step_bench(amp: bool, channels_last: bool, iters: int) -> dict:
    from megdet_hpc.config import load_config
    from megdet_hpc.modeling import build_model

    torch.cuda.reset_peak_memory_stats()
    cfg = load_config(None, ["model.num_classes=80"])
    model = build_model(cfg).cuda().train()
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.001, momentum=0.9)
    scaler = torch.amp.GradScaler("cuda", enabled=amp)
    gen = torch.Generator().manual_seed(0)
    images = [torch.rand(3, 800, 1216, generator=gen).cuda() for _ in range(2)]
    targets = [{"boxes": torch.tensor([[100.0, 120.0, 400.0, 500.0], [600.0, 50.0, 900.0, 300.0]]).cuda(),
                "labels": torch.tensor([3, 17]).cuda()} for _ in range(2)]  # fmt: skip

    def step() -> None:
        with torch.autocast("cuda", enabled=amp):
            loss = sum(model(images, targets).values())
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()

    s = timed(step, iters)
    return {"amp": amp, "channels_last": channels_last, "s_per_iter": s, "images_per_s": 2 / s,
            "peak_mem_GiB": torch.cuda.max_memory_allocated() / 2**30}  # fmt: skip


def bn_bench(iters: int) -> dict:
    import torchvision
    from torch import nn

    from megdet_hpc.distributed.env import ClusterEnvironment
    from megdet_hpc.distributed.single import SingleProcessComm
    from megdet_hpc.layers import CrossGPUBatchNorm2d

    shapes: list[tuple[int, ...]] = []
    body = torchvision.models.resnet50(weights=None).eval()
    hooks = [m.register_forward_pre_hook(lambda _m, a: shapes.append(tuple(a[0].shape)))
             for m in body.modules() if isinstance(m, nn.BatchNorm2d)]  # fmt: skip
    with torch.no_grad():
        body(torch.zeros(2, 3, 800, 1216))
    for h in hooks:
        h.remove()
    comm = SingleProcessComm(ClusterEnvironment("local", 0, 1, 0, 1))
    xs = [torch.randn(s, device="cuda") for s in shapes]
    gs = [torch.randn(s, device="cuda") for s in shapes]
    bns = [nn.BatchNorm2d(s[1]).cuda() for s in shapes]
    cgs = [CrossGPUBatchNorm2d(s[1], comm=comm).cuda() for s in shapes]
    for m in cgs:
        m._force_sync = True

    def run(mods) -> None:  # type: ignore[no-untyped-def]
        for m, x, g in zip(mods, xs, gs):
            m(x.requires_grad_(True)).backward(g)

    t_bn, t_cg = timed(lambda: run(bns), iters), timed(lambda: run(cgs), iters)
    return {"layers": len(shapes), "bn_ms": 1e3 * t_bn, "cgbn_ms": 1e3 * t_cg, "cgbn_over_bn": t_cg / t_bn}


def main() -> int:
    if not torch.cuda.is_available():
        print("bench/gpu.py: error: no CUDA device", file=sys.stderr)
        return 2
    iters = int(os.environ.get("GPU_BENCH_ITERS", "20"))
    torch.backends.cudnn.benchmark = True
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
              "steps": [train_step_bench(False, False, iters), train_step_bench(True, True, iters)],
              "bn": bn_bench(iters)}  # fmt: skip
    print(f"{result['device']} (torch {result['torch']}): Faster R-CNN R50-FPN, 2 images/GPU, 800x1216")
    print(f"{'mode':<26}{'s/iter':>10}{'images/s':>10}{'peak GiB':>10}")
    for r in result["steps"]:
        mode = "AMP + channels_last" if r["amp"] else "fp32"
        print(f"{mode:<26}{r['s_per_iter']:>10.4f}{r['images_per_s']:>10.2f}{r['peak_mem_GiB']:>10.2f}")
    b = result["bn"]
    print(f"\n{b['layers']} BN layers fwd+bwd: nn.BatchNorm2d {b['bn_ms']:.2f} ms, CGBN path {b['cgbn_ms']:.2f} ms "
          f"(x{b['cgbn_over_bn']:.2f}, N=1 forced)")  # fmt: skip
    text = json.dumps(result, indent=2)
    (REPO / "bench" / "results").mkdir(parents=True, exist_ok=True)
    (REPO / "bench" / "results" / "gpu.json").write_text(text)
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "gpu.json").write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
