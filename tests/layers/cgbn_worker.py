"""Runs on every rank of a real multi-process job and checks CGBN against single-process BN.

Every rank builds the *whole* batch from the same seed, runs CGBN on its own shard, and compares its
outputs, input gradients, (group-summed) weight/bias gradients and running statistics with a reference
BN applied to the concatenated batch (float64, CPU) in this process.  Results (max abs errors,
collective counts) go back through ``write_report`` for the pytest side to assert on.

``MEGDET_TEST_DEVICE=cuda`` runs the layer on the GPU (ranks may share one), ``MEGDET_TEST_KERNELS``
picks its kernels; fp16/bf16 cases then run under ``torch.autocast`` as in an AMP step.
"""

from __future__ import annotations

import contextlib
import os
import sys

import torch
from torch import nn

from megdet_hpc import distributed
from megdet_hpc.distributed.comm import Comm
from megdet_hpc.launch.local import write_report
from megdet_hpc.layers import CrossGPUBatchNorm2d

KERNELS = os.environ.get("MEGDET_TEST_KERNELS", "auto")
# MEGDET_TEST_CASES=a,b runs only those cases (a compiling run keeps its compilations few); default all.
WANTED = set(filter(None, os.environ.get("MEGDET_TEST_CASES", "").split(","))) or None
DEVICE = torch.device("cpu")  # set in main(): the rank's GPU when MEGDET_TEST_DEVICE=cuda

C, H, W = 8, 5, 4


def shards(sizes: list[int], offset: float = 0.0, dtype=torch.float32, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    full = torch.randn(sum(sizes), C, H, W, generator=gen, dtype=torch.float64) * 2.0 + 0.5
    full = (full + offset).to(dtype)
    grad = torch.randn(sum(sizes), C, H, W, generator=gen, dtype=torch.float64).to(dtype)
    return full, grad


def reference(full: torch.Tensor, grad: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor):
    """BN on the concatenated batch in float64 (one process)."""
    bn = nn.BatchNorm2d(C, momentum=0.1).double()
    with torch.no_grad():
        bn.weight.copy_(weight.double())
        bn.bias.copy_(bias.double())
    x = full.double().requires_grad_(True)
    y = bn(x)
    (y * grad.double()).sum().backward()
    return y.detach(), x.grad, bn.weight.grad, bn.bias.grad, bn.running_mean, bn.running_var


def check_case(
    comm, name, sizes, group_size=None, offset=0.0, two_pass=False, dtype=torch.float32, channels_last=False
):
    rank, world = comm.rank, comm.size
    gs = group_size or world
    first = (rank // gs) * gs
    group_sizes = sizes[first : first + gs]
    full, grad = shards(group_sizes, offset, dtype, seed=first + len(name))
    torch.manual_seed(7)
    layer = CrossGPUBatchNorm2d(C, group_size=group_size, two_pass=two_pass, comm=comm, kernels=KERNELS)
    with torch.no_grad():
        layer.weight.copy_(torch.rand(C) + 0.5)
        layer.bias.copy_(torch.randn(C))
    layer.to(DEVICE)
    start = sum(group_sizes[: rank - first])
    stop = start + group_sizes[rank - first]
    x = full[start:stop].clone().to(DEVICE)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_(True)
    amp = dtype in (torch.float16, torch.bfloat16) and DEVICE.type == "cuda"
    autocast = torch.autocast("cuda", dtype=dtype) if amp else contextlib.nullcontext()
    comm.counters.reset(keep_log=True)
    with autocast:
        y = layer(x)
    fwd_log = list(comm.counters.log)
    comm.counters.reset(keep_log=True)
    (y.float() * grad[start:stop].float().to(DEVICE)).sum().backward()
    bwd_log = list(comm.counters.log)
    y, layer = y.cpu(), layer.cpu()
    ref_y, ref_gx, ref_gw, ref_gb, ref_rm, ref_rv = reference(
        full, grad, layer.weight.detach(), layer.bias.detach()
    )
    gw = layer.weight.grad.detach().clone().to(DEVICE)
    gb = layer.bias.grad.detach().clone().to(DEVICE)
    group = comm.contiguous_group(group_size)
    comm.allreduce_(gw, group)
    comm.allreduce_(gb, group)
    gw, gb = gw.cpu(), gb.cpu()
    # Running buffers must be bit-identical on every rank of the group.
    buffers = comm.allgather_object((layer.running_mean.tolist(), layer.running_var.tolist()))
    same_buffers = all(b == buffers[first] for b in buffers[first : first + gs])
    err = {
        "y": (y.double() - ref_y[start:stop]).abs().max().item() if stop > start else 0.0,
        "grad_x": (x.grad.cpu().double() - ref_gx[start:stop]).abs().max().item() if stop > start else 0.0,
        "grad_w": (gw.double() - ref_gw).abs().max().item(),
        "grad_b": (gb.double() - ref_gb).abs().max().item(),
        "running_mean": (layer.running_mean.double() - ref_rm).abs().max().item(),
        "running_var": (layer.running_var.double() - ref_rv).abs().max().item(),
        "same_buffers": same_buffers,
        "out_dtype": str(y.dtype),
        "channels_last": y.is_contiguous(memory_format=torch.channels_last),
        "fwd_collectives": [list(e) for e in fwd_log],
        "bwd_collectives": [list(e) for e in bwd_log],
    }
    return err


def main(comm: Comm) -> None:
    global DEVICE
    if os.environ.get("MEGDET_TEST_DEVICE") == "cuda":  # ranks share one GPU (gloo) or take one each (NCCL)
        DEVICE = torch.device("cuda", comm.local_rank % torch.cuda.device_count())
        torch.cuda.set_device(DEVICE)
    world = comm.size
    results = {"backend": comm.name, "world": world, "rank": comm.rank}
    equal = [2] * world
    uneven = ([3, 0, 1, 2] * 2)[:world]
    cases = {
        "equal": lambda: check_case(comm, "equal", equal),
        "uneven": lambda: check_case(comm, "uneven", uneven),
        "offset": lambda: check_case(comm, "offset", equal, offset=1e4),
        "two_pass": lambda: check_case(comm, "two_pass", uneven, two_pass=True),
        "channels_last": lambda: check_case(comm, "channels_last", equal, channels_last=True),
        "bf16": lambda: check_case(comm, "bf16", equal, dtype=torch.bfloat16),
        "fp16": lambda: check_case(comm, "fp16", equal, dtype=torch.float16),
    }
    if world % 2 == 0 and world > 2:
        cases["group2"] = lambda: check_case(comm, "group2", uneven, group_size=2)
    for name, run in cases.items():
        if WANTED is None or name in WANTED:
            results[name] = run()
    # Eval mode communicates nothing.
    layer = CrossGPUBatchNorm2d(C, comm=comm).eval().to(DEVICE)
    comm.counters.reset()
    layer(torch.randn(2, C, H, W, device=DEVICE))
    results["eval_collectives"] = sum(comm.counters.calls.values())
    # A group size that does not divide the world is refused with a clear error.
    try:
        CrossGPUBatchNorm2d(C, group_size=world + 1, comm=comm).train().to(DEVICE)(
            torch.randn(2, C, H, W, device=DEVICE)
        )
        results["bad_group_error"] = ""
    except Exception as exc:  # noqa: BLE001 - we record the message
        results["bad_group_error"] = str(exc)
    results["device"] = str(DEVICE)
    # How many graphs torch.compile built in this rank (kernels="compiled" must have used them).
    dynamo = sys.modules.get("torch._dynamo.utils")
    results["compiled_graphs"] = dynamo.counters["stats"]["unique_graphs"] if dynamo else 0
    write_report(comm.rank, results)


if __name__ == "__main__":
    distributed.run_with_comm(main)
