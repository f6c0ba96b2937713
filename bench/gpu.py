"""Every GPU measurement in one run (``bash bench/gpu.sh``; budget: under 6 minutes on one H100/H200).

Sections (each a table; all of it in ``bench/results/gpu.json`` and ``$OUT/gpu.json``):

* ``bn``: fwd+bwd of the 53 BatchNorm layers of ResNet-50 at 2 images of 800x1216, fp32 and fp16:
  ``nn.BatchNorm2d`` vs CGBN with its statistics path forced in one process (``force_sync``), with the
  portable kernels, with torch's fused SyncBN kernels and with ``kernels="compiled"`` (torch.compile;
  its row is left out, and ``gpu.json["compiled_kernels"]`` says why, if it cannot compile here).
  Target: CGBN <= 1.5x BN.
* ``sync_free``: a CGBN forward + backward (every kernel set, several calls) under
  ``torch.cuda.set_sync_debug_mode("error")``.
* ``graph``: one CGBN layer captured in CUDA graphs (``make_graphed_callables``) and replayed, against
  the eager layer; eager vs replay time.
* ``two_ranks``: 2 ranks sharing the GPU, the 53 layers with CGBN over each statistics transport side by
  side (``MEGDET_CGBN_COMM``: torchrun's gloo group, mpirun's mpi4py, a torch gloo group under mpirun;
  NCCL where there are 2 GPUs: it refuses two ranks on one device), and under torchrun against
  ``torch.nn.SyncBatchNorm``.  Target: CGBN no slower.
* ``step``: Faster R-CNN R50-FPN training step, AMP, 2 images of 800 px, the project's loader:
  ``SimpleTrainer.run_step`` vs a plain AMP loop on the same model and data vs torchvision's
  ``fasterrcnn_resnet50_fpn`` plain loop, and the step with CGBN forced vs plain BN; images/s and peak
  memory.  Targets: run_step >= 1.0x both loops; CGBN forced <= 1.08x BN.  (Needs pycocotools for the
  loader: importable, or installed by ``bench/gpu.sh`` from ``$WHEELS``; otherwise skipped and said.)
* ``defaults``: the same step with one GPU default changed at a time (fp32 / bf16, channels_last,
  cudnn.benchmark, TF32, pinned memory), so each default is a measurement.
* ``memory``: plain AMP step at 2 and 8 images of 800x1333, without / with activation checkpointing of
  the ResNet stages / stages + FPN: s/iter and peak memory (MegDet's sub-linear memory).

Contenders of a section run in interleaved blocks in one process and are reported as medians and
ratios (``torch.utils.benchmark`` timers).  Every target is checked in code (``check_targets``) and
written as pass/fail into ``gpu.json["targets"]``.  ``--smoke`` runs every section on the CPU at toy sizes (what CI checks: the script works).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib.util
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import torch
from common import REPO, bn_shapes, environment, new_figure, savefig, table, timing_run, write_result
from torch import nn

HERE = Path(__file__).resolve()


class Sizes:
    """Problem sizes: the real ones on a GPU, toy ones for the CPU smoke run."""

    def __init__(self, smoke: bool) -> None:
        # Smoke sizes only exercise the code paths (CI runs it on one CPU core): one call per contender.
        self.smoke = smoke
        self.bn_hw = (64, 96) if smoke else (800, 1216)
        self.image = 64 if smoke else 800
        self.memory_hw = (64, 96) if smoke else (800, 1333)
        self.memory_batches = (1,) if smoke else (2, 8)
        self.bn_iters = 1 if smoke else 10
        self.step_iters = 1 if smoke else 8
        self.blocks = 1 if smoke else 4
        self.warmup = 0 if smoke else 3
        # The CPU smoke checks the script, not the model: our detector on ResNet-18 there (its R50
        # weights alone take seconds to initialise, ten times over); torchvision's own R50 stays.
        self.smoke_model = ["model.backbone=resnet18"] if smoke else []


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved(
    contenders: dict[str, Callable[[], None]], iters: int, blocks: int, warmup: int, device: torch.device
) -> dict[str, float]:
    """Median seconds per call of each contender: ``torch.utils.benchmark`` timers (they synchronise
    CUDA around each measurement) run in interleaved blocks, so drift hits every contender alike."""
    import torch.utils.benchmark as benchmark

    for fn in contenders.values():
        for _ in range(warmup):
            fn()
    timers = {name: benchmark.Timer("fn()", globals={"fn": fn}) for name, fn in contenders.items()}
    samples: dict[str, list[float]] = {name: [] for name in contenders}
    for _ in range(blocks):
        for name, timer in timers.items():
            samples[name].append(timer.timeit(iters).median)
    return {name: statistics.median(v) for name, v in samples.items()}


def peak_memory(fn: Callable[[], None], device: torch.device) -> float:
    """GiB allocated at the peak of one call, above what was allocated before it."""
    if device.type != "cuda":
        return float("nan")
    sync(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    sync(device)
    return (torch.cuda.max_memory_allocated(device) - base) / 2**30


# -- BN layers --------------------------------------------------------------------------------------
def bn_layers(sizes: Sizes, device: torch.device, comm: Any) -> list[dict]:
    from megdet_hpc.layers import CrossGPUBatchNorm2d

    shapes = bn_shapes(*sizes.bn_hw)
    rows = []
    for dtype in (torch.float32, torch.float16):
        if dtype == torch.float16 and device.type != "cuda":
            continue
        gen = torch.Generator().manual_seed(0)
        xs = [torch.randn(s, generator=gen).to(device, dtype) for s in shapes]
        gs = [torch.randn(s, generator=gen).to(device, dtype) for s in shapes]
        stacks = {
            "nn.BatchNorm2d": [nn.BatchNorm2d(s[1]).to(device) for s in shapes],
            "CGBN portable": [
                CrossGPUBatchNorm2d(s[1], comm=comm, force_sync=True, kernels="portable").to(device)
                for s in shapes
            ],
            "CGBN fused": [
                CrossGPUBatchNorm2d(s[1], comm=comm, force_sync=True, kernels="fused").to(device)
                for s in shapes
            ],
        }
        if compiled_kernels_error(device, comm) == "":
            stacks["CGBN compiled"] = [
                CrossGPUBatchNorm2d(s[1], comm=comm, force_sync=True, kernels="compiled").to(device)
                for s in shapes
            ]

        def run(mods: list[nn.Module], xs: list[torch.Tensor] = xs, gs: list[torch.Tensor] = gs) -> None:
            for m, x, g in zip(mods, xs, gs):
                m(x.detach().requires_grad_(True)).backward(g)

        times = interleaved(
            {k: (lambda m=m: run(m)) for k, m in stacks.items()},
            sizes.bn_iters,
            sizes.blocks,
            sizes.warmup,
            device,
        )
        base = times["nn.BatchNorm2d"]
        for name, t in times.items():
            rows.append(
                {
                    "dtype": str(dtype).split(".")[1],
                    "contender": name,
                    "layers": len(shapes),
                    "ms": 1e3 * t,
                    "vs_bn": t / base,
                }
            )
    return rows


@functools.cache
def compiled_kernels_error(device: torch.device, comm: Any) -> str:
    """ "" if ``kernels="compiled"`` works here, else why not (its first line).  Only on CUDA: on the
    CPU smoke it would add a ~30 s compilation (tests/layers/test_cgbn_compiled.py covers the CPU)."""
    if device.type != "cuda":
        return "CUDA only in this script"
    from megdet_hpc.layers import CrossGPUBatchNorm2d

    try:
        layer = CrossGPUBatchNorm2d(8, comm=comm, force_sync=True, kernels="compiled").to(device)
        layer(torch.randn(2, 8, 4, 4, device=device, requires_grad=True)).sum().backward()
        sync(device)
    except Exception as exc:  # noqa: BLE001 - a missing Triton or compiler is reported, not fatal
        return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    return ""


def kernel_sets(device: torch.device, comm: Any) -> tuple[str, ...]:
    return ("portable", "fused") + (("compiled",) if compiled_kernels_error(device, comm) == "" else ())


# -- sync-free ----------------------------------------------------------------------------------------
def sync_free(device: torch.device, comm: Any) -> list[dict]:
    from megdet_hpc.layers import CrossGPUBatchNorm2d

    rows = []
    for kernels in kernel_sets(device, comm):
        for layout in ("contiguous", "channels_last"):
            layer = CrossGPUBatchNorm2d(64, comm=comm, force_sync=True, kernels=kernels).to(device)
            x = torch.randn(2, 64, 40, 56, device=device) + 3.0
            if layout == "channels_last":
                x = x.contiguous(memory_format=torch.channels_last)
            error = ""
            mode = contextlib.nullcontext()
            if device.type == "cuda":
                sync(device)
                torch.cuda.set_sync_debug_mode("error")
            try:
                with mode:
                    for _ in range(20):  # first call, reused buffers, running-stat updates
                        y = layer(x.detach().requires_grad_(True))
                        y.backward(torch.ones_like(y))
            except RuntimeError as exc:
                error = str(exc).splitlines()[0]
            finally:
                if device.type == "cuda":
                    torch.cuda.set_sync_debug_mode(0)
            rows.append(
                {"kernels": kernels, "layout": layout, "calls": 20, "sync_free": not error, "error": error}
            )
    return rows


# -- CUDA graph capture -------------------------------------------------------------------------------
def graph_capture(device: torch.device, comm: Any) -> list[dict]:
    """One CGBN layer's forward + backward captured in CUDA graphs and replayed on new data, against the
    eager layer (what ``tests/layers/test_cgbn_gpu.py`` asserts, with the replay's speed beside it)."""
    import copy

    from megdet_hpc.layers import CrossGPUBatchNorm2d

    rows = []
    for kernels in kernel_sets(device, comm):
        row: dict[str, Any] = {"kernels": kernels, "captured": False, "max_diff": None, "error": ""}
        if device.type != "cuda":
            row["error"] = "needs CUDA"
            rows.append(row)
            continue
        try:
            layer = CrossGPUBatchNorm2d(256, comm=comm, force_sync=True, kernels=kernels).to(device)
            eager = copy.deepcopy(layer)
            x = torch.randn(2, 256, 100, 152, device=device, requires_grad=True)
            graphed = torch.cuda.make_graphed_callables(layer, (x,))
            data = torch.randn_like(x) * 3 + 50
            grad = torch.randn_like(x)
            xg, xe = data.clone().requires_grad_(True), data.clone().requires_grad_(True)
            yg, ye = graphed(xg), eager(xe)
            yg.backward(grad)
            ye.backward(grad)
            row["max_diff"] = max(float((yg - ye).abs().max()), float((xg.grad - xe.grad).abs().max()))
            row["captured"] = True

            def call(fn: Callable[..., torch.Tensor], x: torch.Tensor = x, g: torch.Tensor = grad) -> None:
                fn(x.detach().requires_grad_(True)).backward(g)

            times = interleaved(
                {"eager": partial(call, eager), "graph": partial(call, graphed)},
                20,
                3,
                2,
                device,
            )
            row.update(eager_ms=1e3 * times["eager"], graph_ms=1e3 * times["graph"])
        except Exception as exc:  # noqa: BLE001 - the table records why capture failed
            row["error"] = str(exc).splitlines()[0][:200]
        rows.append(row)
    return rows


# -- targets ------------------------------------------------------------------------------------------
def check_targets(result: dict[str, Any]) -> dict[str, bool | None]:
    """Each target of issues 9, 10 and 16, checked on the measured rows (None: section not run)."""
    targets: dict[str, bool | None] = {}
    for dtype in sorted({r["dtype"] for r in result.get("bn", [])}):
        best = min(
            r["vs_bn"] for r in result["bn"] if r["dtype"] == dtype and r["contender"] != "nn.BatchNorm2d"
        )
        targets[f"CGBN layers <= 1.5x BN ({dtype})"] = best <= 1.5
    if "sync_free" in result:
        targets["CGBN never synchronises the host"] = all(r["sync_free"] for r in result["sync_free"])
    if "graph" in result:
        targets["CGBN captured in a CUDA graph, equal to eager"] = all(
            r["captured"] and r["max_diff"] is not None and r["max_diff"] < 1e-4 for r in result["graph"]
        )
    two = {r["contender"]: r for r in result.get("two_ranks", [])}
    if "CGBN" in two and two["CGBN"].get("vs_syncbn") is not None:
        targets["2 ranks: CGBN no slower than torch.nn.SyncBatchNorm"] = two["CGBN"]["vs_syncbn"] <= 1.0
    step = {r["contender"]: r for r in result.get("step", [])}
    if step:
        ours = step["SimpleTrainer.run_step"]["s_per_iter"]
        targets["run_step >= 1.0x plain AMP loop"] = ours <= step["plain AMP loop, same model"]["s_per_iter"]
        targets["run_step >= 1.0x torchvision loop"] = (
            ours <= step["torchvision fasterrcnn_resnet50_fpn loop"]["s_per_iter"]
        )
        targets["step with CGBN forced <= 1.08x BN step"] = (
            step["SimpleTrainer.run_step, CGBN forced"]["s_per_iter"]
            <= 1.08 * step["SimpleTrainer.run_step, nn.BatchNorm2d"]["s_per_iter"]
        )
    for images in sorted({r["images_per_gpu"] for r in result.get("memory", [])}):
        rows = [r for r in result["memory"] if r["images_per_gpu"] == images and r["checkpointing"] != "none"]
        targets[f"checkpointing: memory halved for <= 1.3x time ({images} images)"] = any(
            r["memory_saved"] is not None and r["memory_saved"] >= 0.5 and r["time_vs_none"] <= 1.3
            for r in rows
        )
    return targets


# -- 2 ranks on one GPU -----------------------------------------------------------------------------
def two_ranks_worker(comm: Any, smoke: bool) -> None:
    from megdet_hpc.launch.local import write_report
    from megdet_hpc.layers import CrossGPUBatchNorm2d

    sizes = Sizes(smoke)
    device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    shapes = [(1, *s[1:]) for s in bn_shapes(*sizes.bn_hw)]  # 2 ranks x 1 image = the 2-image batch
    gen = torch.Generator().manual_seed(comm.rank)
    xs = [torch.randn(s, generator=gen).to(device) for s in shapes]
    gs = [torch.randn(s, generator=gen).to(device) for s in shapes]
    cg = [CrossGPUBatchNorm2d(s[1], comm=comm).to(device) for s in shapes]
    sbn = [nn.SyncBatchNorm(s[1]).to(device) for s in shapes]

    def run(mods: list[nn.Module]) -> None:
        for m, x, g in zip(mods, xs, gs):
            m(x.detach().requires_grad_(True)).backward(g)

    contenders = {"CGBN": lambda: run(cg), "torch.nn.SyncBatchNorm": lambda: run(sbn)}
    # SyncBatchNorm refuses CPU tensors (the smoke run times CGBN only) and needs torch.distributed's
    # default group (not there under mpirun with the MPI comm).
    if device.type == "cpu" or comm.name != "torch":
        contenders.pop("torch.nn.SyncBatchNorm")
    comm.barrier()
    times = interleaved(contenders, sizes.bn_iters, sizes.blocks, sizes.warmup, device)
    if comm.is_main:
        write_report(
            0,
            {
                "backend": comm.name,
                "transport": os.environ.get("MEGDET_CGBN_COMM", "main"),
                "ms": {k: 1e3 * v for k, v in times.items()},
            },
        )


# (label, launcher, environment): one statistics transport each.  Gradients are not part of this
# benchmark; only the layers' collectives run.
TRANSPORTS = [
    ("torchrun, gloo (main)", "torchrun", {"MEGDET_COMM": "torch", "MEGDET_TORCH_BACKEND": "gloo"}),
    ("mpirun, mpi4py (main)", "mpirun", {"MEGDET_COMM": "mpi"}),
    ("mpirun, torch-gloo group", "mpirun", {"MEGDET_COMM": "mpi", "MEGDET_CGBN_COMM": "torch-gloo"}),
]
NCCL_TRANSPORT = ("torchrun, nccl group", "torchrun", {"MEGDET_COMM": "torch", "MEGDET_CGBN_COMM": "nccl"})


def two_ranks(smoke: bool) -> list[dict]:
    from common import collect

    transports = list(TRANSPORTS)
    if torch.cuda.device_count() >= 2:
        transports.append(NCCL_TRANSPORT)
    rows: list[dict] = []
    sbn = None
    for label, launcher, extra in transports:
        env = {"OMP_NUM_THREADS": "4", **extra}
        argv = [str(HERE), "--two-ranks-worker", *(["--smoke"] if smoke else [])]
        try:
            report = collect(launcher, 2, argv, env=env, timeout=600)
        except Exception as exc:  # noqa: BLE001 - a launcher missing on the GPU machine is a row, not a crash
            rows.append(
                {"contender": "CGBN", "transport": label, "ms": None, "error": str(exc).splitlines()[0]}
            )
            continue
        ms = report["ms"]
        sbn = ms.get("torch.nn.SyncBatchNorm", sbn)
        for k, v in ms.items():
            name = k if k != "CGBN" or label == TRANSPORTS[0][0] else f"CGBN over {label}"
            rows.append({"contender": name, "transport": label, "ms": v, "error": ""})
    for row in rows:
        row["vs_syncbn"] = row["ms"] / sbn if sbn and row["ms"] is not None else None
    return rows


# -- training steps -----------------------------------------------------------------------------------
def synthetic_data(size: int) -> Path:
    from megdet_hpc.data.synthetic import generate

    return generate(
        Path(tempfile.gettempdir()) / f"megdet-gpu-data-{size}", train=48, val=4, size=size, seed=0
    )


def step_overrides(sizes: Sizes, data: Path, *extra: str) -> list[str]:
    return [
        *sizes.smoke_model,
        "model.num_classes=80",
        f"model.min_size={sizes.image}",
        f"model.max_size={max(sizes.image, 1333 if not sizes.smoke else 64)}",
        "data.images_per_gpu=2",
        "solver.total_batch=2",
        "solver.base_batch=16",
        "solver.warmup_iters=0",
        "data.num_workers=2",
        f"data.train_images={data}/train",
        f"data.train_annotations={data}/annotations/instances_train.json",
        f"data.val_images={data}/val",
        f"data.val_annotations={data}/annotations/instances_val.json",
        f"solver.amp={'off' if sizes.smoke else 'fp16'}",
        f"train.channels_last={'false' if sizes.smoke else 'true'}",
        *extra,
    ]


def plain_loop(
    model: nn.Module, batches: Any, amp: torch.dtype | None, device: torch.device
) -> Callable[[], None]:
    """The loop a user writes: forward under autocast, GradScaler, SGD."""
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-4, momentum=0.9)
    scaler = torch.amp.GradScaler(device.type, enabled=amp == torch.float16)

    def step() -> None:
        images, targets, _ = next(batches)
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            loss = sum(model(images, targets).values())
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()

    return step


def steps(sizes: Sizes, device: torch.device) -> tuple[list[dict], list[dict]]:
    import torchvision

    from megdet_hpc.config import load_config
    from megdet_hpc.data.loader import build_train_loader
    from megdet_hpc.data.prefetch import DevicePrefetcher
    from megdet_hpc.layers import CrossGPUBatchNorm2d

    data = synthetic_data(sizes.image)
    config = REPO / "configs/megdet_r50_fpn_bs16.yaml"
    trainers = {"SimpleTrainer.run_step": timing_run(config, step_overrides(sizes, data))}
    forced = timing_run(config, step_overrides(sizes, data))
    for m in forced.trainer.model.modules():
        if isinstance(m, CrossGPUBatchNorm2d):
            m.force_sync = True
    trainers["SimpleTrainer.run_step, CGBN forced"] = forced
    trainers["SimpleTrainer.run_step, nn.BatchNorm2d"] = timing_run(
        config, step_overrides(sizes, data, "model.norm=bn")
    )
    reference = trainers["SimpleTrainer.run_step"]
    amp = reference.trainer.amp_dtype

    def batches() -> DevicePrefetcher:  # the same image stream, through the project's loader
        loader, _ = build_train_loader(reference.cfg, reference.data.train, 0, 1, device)
        return DevicePrefetcher(iter(loader), device)

    tv_cfg = load_config(config, step_overrides(sizes, data))
    tv = torchvision.models.detection.fasterrcnn_resnet50_fpn(
        weights=None,
        weights_backbone=None,
        num_classes=81,
        min_size=tv_cfg.model.min_size,
        max_size=tv_cfg.model.max_size,
    ).to(device)
    if tv_cfg.train.channels_last:
        tv = tv.to(memory_format=torch.channels_last)
    contenders: dict[str, Callable[[], None]] = {name: t.trainer.run_step for name, t in trainers.items()}
    contenders["plain AMP loop, same model"] = plain_loop(reference.trainer.model, batches(), amp, device)
    contenders["torchvision fasterrcnn_resnet50_fpn loop"] = plain_loop(tv, batches(), amp, device)
    times = interleaved(contenders, sizes.step_iters, sizes.blocks, sizes.warmup, device)
    memory = {name: peak_memory(fn, device) for name, fn in contenders.items()}
    base = times["plain AMP loop, same model"]
    rows = [
        {
            "contender": k,
            "images": 2,
            "s_per_iter": v,
            "images_per_s": 2 / v,
            "speed_vs_plain": base / v,
            "peak_GiB": memory[k],
        }
        for k, v in times.items()
    ]

    # GPU defaults, one at a time, against the default configuration.
    variants = {
        "defaults (AMP fp16, channels_last, pinned)": [],
        "fp32 (no AMP)": ["solver.amp=off"],
        "AMP bf16": ["solver.amp=bf16"],
        "no channels_last": ["train.channels_last=false"],
        "cudnn.benchmark on": ["train.cudnn_benchmark=true"],
        "TF32 matmul on": ["train.tf32=true"],
        "no pinned memory": ["data.pin_memory=false"],
    }
    if sizes.smoke:
        variants = dict(list(variants.items())[:2])
    del trainers, forced, contenders
    variant_trainers = {
        name: timing_run(config, step_overrides(sizes, data, *extra)) for name, extra in variants.items()
    }

    def switched(t: Any) -> Callable[[], None]:
        def run() -> None:  # process-wide switches follow the trainer being timed
            torch.backends.cudnn.benchmark = t.cfg.train.cudnn_benchmark
            torch.backends.cuda.matmul.allow_tf32 = t.cfg.train.tf32
            t.trainer.run_step()

        return run

    vtimes = interleaved(
        {n: switched(t) for n, t in variant_trainers.items()},
        sizes.step_iters,
        sizes.blocks,
        sizes.warmup,
        device,
    )
    vbase = vtimes["defaults (AMP fp16, channels_last, pinned)"]
    defaults = [
        {"variant": k, "s_per_iter": v, "images_per_s": 2 / v, "vs_defaults": v / vbase}
        for k, v in vtimes.items()
    ]
    return rows, defaults


def memory_rows(sizes: Sizes, device: torch.device) -> list[dict]:
    from megdet_hpc.config import load_config
    from megdet_hpc.modeling import build_model

    h, w = sizes.memory_hw
    rows = []
    for images in sizes.memory_batches:
        contenders: dict[str, Callable[[], None]] = {}
        for label, places in (
            ("none", "[]"),
            ("ResNet stages", "[backbone]"),
            ("stages + FPN", "[backbone,fpn]"),
        ):
            cfg = load_config(
                REPO / "configs/megdet_r50_fpn_bs16.yaml",
                [
                    *sizes.smoke_model,
                    "model.num_classes=80",
                    f"model.min_size={h}",
                    f"model.max_size={w}",
                    f"model.activation_checkpointing={places}",
                ],
            )
            model = build_model(cfg).to(device).train()
            gen = torch.Generator().manual_seed(images)
            batch = [torch.rand(3, h, w, generator=gen).to(device) for _ in range(images)]
            targets = [
                {
                    "boxes": torch.tensor(
                        [[10.0, 20.0, w / 3, h / 2], [w / 2, h / 3, w - 5, h - 5]], device=device
                    ),
                    "labels": torch.tensor([3, 17], device=device),
                }
                for _ in range(images)
            ]
            batches = iter(lambda b=batch, t=targets: (b, t, (0, 0)), None)
            amp = torch.float16 if device.type == "cuda" else None
            contenders[label] = plain_loop(model, batches, amp, device)
        iters = sizes.step_iters if sizes.smoke else max(2, sizes.step_iters // 2)
        times = interleaved(contenders, iters, sizes.blocks, sizes.warmup, device)
        peaks = {k: peak_memory(fn, device) for k, fn in contenders.items()}
        for k, t in times.items():
            rows.append(
                {
                    "images_per_gpu": images,
                    "checkpointing": k,
                    "s_per_iter": t,
                    "peak_GiB": peaks[k],
                    "time_vs_none": t / times["none"],
                    "memory_saved": 1 - peaks[k] / peaks["none"] if peaks["none"] == peaks["none"] else None,
                }
            )
        del contenders
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


# -- main ---------------------------------------------------------------------------------------------
def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="toy sizes on the CPU (checks the script itself)")
    p.add_argument("--only", nargs="*", default=[], help="sections to run (default: all)")
    p.add_argument("--two-ranks-worker", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.two_ranks_worker:
        from megdet_hpc.distributed import run_with_comm

        run_with_comm(lambda comm: two_ranks_worker(comm, a.smoke))
        return 0
    if not a.smoke and not torch.cuda.is_available():
        print(
            "bench/gpu.py: error: no CUDA device (use --smoke for a CPU check of the script)", file=sys.stderr
        )
        return 2
    from megdet_hpc.distributed.single import SingleProcessComm

    device = torch.device("cpu") if a.smoke else torch.device("cuda", 0)
    sizes = Sizes(a.smoke)
    comm = SingleProcessComm()
    want = set(a.only) or {"bn", "sync_free", "graph", "two_ranks", "step", "memory"}
    has_coco = importlib.util.find_spec("pycocotools") is not None
    result: dict[str, Any] = {"smoke": a.smoke, "notes": []}
    started = time.perf_counter()
    if "bn" in want:
        result["bn"] = bn_layers(sizes, device, comm)
        print(
            f"\n53 BN layers of ResNet-50, fwd+bwd, 2 images {sizes.bn_hw[0]}x{sizes.bn_hw[1]} (CGBN forced, N=1)"
        )
        print(
            table(
                result["bn"],
                [("dtype", "dtype"), ("contender", "contender"), ("ms", "ms"), ("vs_bn", "x BN")],
            )
        )
    if "sync_free" in want:
        result["sync_free"] = sync_free(device, comm)
        print("\nCGBN forward+backward under torch.cuda.set_sync_debug_mode('error')")
        print(
            table(
                result["sync_free"],
                [
                    ("kernels", "kernels"),
                    ("layout", "layout"),
                    ("calls", "calls"),
                    ("sync_free", "sync-free"),
                    ("error", "error"),
                ],
            )
        )
    if "graph" in want:
        result["graph"] = graph_capture(device, comm)
        print("\nOne CGBN layer (2 x 256 x 100 x 152) captured in CUDA graphs, forward + backward")
        print(
            table(
                result["graph"],
                [
                    ("kernels", "kernels"),
                    ("captured", "captured"),
                    ("max_diff", "max |graph - eager|"),
                    ("eager_ms", "eager ms"),
                    ("graph_ms", "graph ms"),
                    ("error", "error"),
                ],
            )
        )
    if "two_ranks" in want:
        result["two_ranks"] = two_ranks(a.smoke)
        print("\n2 ranks sharing the device, 1 image each, 53 layers fwd+bwd")
        print(
            table(
                result["two_ranks"],
                [
                    ("contender", "contender"),
                    ("transport", "statistics transport"),
                    ("ms", "ms"),
                    ("vs_syncbn", "x SyncBN"),
                    ("error", "error"),
                ],
            )
        )
    if "step" in want:
        if has_coco:
            result["step"], result["defaults"] = steps(sizes, device)
            print(f"\nFaster R-CNN R50-FPN training step, 2 images of {sizes.image} px, the project's loader")
            print(
                table(
                    result["step"],
                    [
                        ("contender", "contender"),
                        ("s_per_iter", "s/iter"),
                        ("images_per_s", "images/s"),
                        ("speed_vs_plain", "speed vs plain"),
                        ("peak_GiB", "peak GiB"),
                    ],
                )
            )
            print("\nGPU defaults, one change at a time")
            print(
                table(
                    result["defaults"],
                    [
                        ("variant", "variant"),
                        ("s_per_iter", "s/iter"),
                        ("images_per_s", "images/s"),
                        ("vs_defaults", "time x defaults"),
                    ],
                )
            )
        else:
            result["notes"].append(
                "step/defaults skipped: pycocotools not importable and no wheel folder given"
            )
            print(
                "\n(step and defaults skipped: pycocotools not importable; pass WHEELS=DIR to bench/gpu.sh)"
            )
    if "memory" in want:
        result["memory"] = memory_rows(sizes, device)
        hw = sizes.memory_hw
        print(f"\nActivation checkpointing (MegDet's sub-linear memory), plain AMP step at {hw[0]}x{hw[1]}")
        print(
            table(
                result["memory"],
                [
                    ("images_per_gpu", "images/GPU"),
                    ("checkpointing", "checkpointing"),
                    ("s_per_iter", "s/iter"),
                    ("peak_GiB", "peak GiB"),
                    ("time_vs_none", "time x none"),
                    ("memory_saved", "memory saved"),
                ],
            )
        )
    result["compiled_kernels"] = compiled_kernels_error(device, comm) or "ok"
    print(f"\nkernels=compiled: {result['compiled_kernels']}")
    result["targets"] = check_targets(result)
    print("\nTargets")
    for name, ok in result["targets"].items():
        print(f"  {'pass' if ok else 'FAIL'}  {name}")
    result["wall_s"] = time.perf_counter() - started
    folder = Path(tempfile.mkdtemp()) if a.smoke else REPO / "bench" / "results"
    path = write_result("gpu", result, folder)
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "gpu.json").write_text(path.read_text())
    if "step" in result:
        fig, ax = new_figure((8, 3.2))
        ax.barh([r["contender"] for r in result["step"]], [r["images_per_s"] for r in result["step"]])
        ax.set_xlabel(f"images/s ({environment()['device']})")
        ax.invert_yaxis()
        savefig(fig, "gpu", folder)
    print(f"\nwrote {path} ({result['wall_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
