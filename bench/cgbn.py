"""CGBN vs nn.BatchNorm2d on the BN layer shapes of ResNet-50-FPN at 2 images, per backend.

``python bench/cgbn.py`` runs every contender side by side (N = 1, 2 and 4 oversubscribed; Horovod
gloo/MPI with its statistics on Horovod or on mpi4py, mpi4py alone, torch gloo; one-pass vs the paper's
two-pass), prints a table of fwd+bwd time per step over all 53 BN layers (median of repeats), the
ratio to local BN measured in the same process, and the latency of one statistics allreduce
(2C+1 float64, C=256).  Writes bench/results/cgbn.json and cgbn.png.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch
from common import (
    bn_shapes,
    collect,
    layer_module_at,
    new_figure,
    savefig,
    summary,
    table,
    write_result,
)
from torch import nn

HERE = Path(__file__).resolve()

# (label, launcher, N, extra env)
CONTENDERS = [
    ("1 process", "single", 1, {}),
    ("horovod gloo", "hvd-gloo", 2, {"MEGDET_CGBN_COMM": "main"}),
    (
        "horovod gloo, CYCLE_TIME=0.1",
        "hvd-gloo",
        2,
        {"MEGDET_CGBN_COMM": "main", "HOROVOD_CYCLE_TIME": "0.1"},
    ),
    ("horovod gloo, CYCLE_TIME=5", "hvd-gloo", 2, {"MEGDET_CGBN_COMM": "main", "HOROVOD_CYCLE_TIME": "5"}),
    ("horovod mpi", "hvd-mpi", 2, {"MEGDET_CGBN_COMM": "main"}),
    ("horovod mpi + stats on mpi4py", "hvd-mpi", 2, {"MEGDET_CGBN_COMM": "mpi"}),
    ("mpi4py (mpirun)", "mpirun", 2, {}),
    ("torch gloo (torchrun)", "torchrun", 2, {}),
    ("horovod mpi + stats on mpi4py", "hvd-mpi", 4, {"MEGDET_CGBN_COMM": "mpi"}),
    ("mpi4py (mpirun)", "mpirun", 4, {}),
    ("torch gloo (torchrun)", "torchrun", 4, {}),
]


def worker(comm: Any, size: int, repeats: int) -> None:
    from megdet_hpc import distributed
    from megdet_hpc.launch.local import write_report
    from megdet_hpc.layers import CrossGPUBatchNorm2d

    stats = distributed.stats_comm()
    torch.manual_seed(comm.rank)
    shapes = bn_shapes(size, size)
    inputs = [torch.randn(s) for s in shapes]
    grads = [torch.randn(s) for s in shapes]

    def layers(kind: str) -> list[nn.Module]:
        if kind == "bn":
            return [nn.BatchNorm2d(s[1]) for s in shapes]
        # N=1: force_sync measures our formulation, not the nn.BatchNorm2d fast path.
        return [
            CrossGPUBatchNorm2d(s[1], two_pass=kind == "two_pass", force_sync=comm.size == 1) for s in shapes
        ]

    def step(mods: list[nn.Module]) -> float:
        comm.barrier()
        t0 = time.perf_counter()
        for m, x, g in zip(mods, inputs, grads):
            xi = x.detach().requires_grad_(True)
            m(xi).backward(g)
        return time.perf_counter() - t0

    result: dict = {
        "rank": comm.rank,
        "size": comm.size,
        "backend": comm.name,
        "stats_comm": stats.name,
        "layers": len(shapes),
        "channels": sum(s[1] for s in shapes),
    }
    built = {k: layers(k) for k in ("bn", "one_pass", "two_pass")}
    samples: dict[str, list[float]] = {k: [] for k in built}
    for _ in range(2):
        for mods in built.values():
            step(mods)
    for _ in range(repeats):  # interleaved: every contender sees the same machine noise
        for kind, mods in built.items():
            samples[kind].append(step(mods))
    result["time_s"] = {k: summary(v) for k, v in samples.items()}
    payload = torch.zeros(2 * 256 + 1, dtype=torch.float64)
    lat = []
    for i in range(300):
        t0 = time.perf_counter()
        stats.allreduce_(payload)
        if i >= 50:
            lat.append(time.perf_counter() - t0)
    result["allreduce_latency_s"] = summary(lat)
    if comm.rank == 0:
        write_report(0, result)


def against(rev: str, size: int, repeats: int) -> dict:
    """This layer vs the one of git revision ``rev``, forced statistics path, one process, interleaved
    with nn.BatchNorm2d: the regression check for "the CPU path must not get slower"."""
    from megdet_hpc.distributed.single import SingleProcessComm

    old = layer_module_at(rev)
    from megdet_hpc.layers import CrossGPUBatchNorm2d

    torch.set_num_threads(1)
    comm = SingleProcessComm()
    shapes = bn_shapes(size, size)
    xs, gs = [torch.randn(s) for s in shapes], [torch.randn(s) for s in shapes]
    olds = [old.CrossGPUBatchNorm2d(s[1], comm=comm) for s in shapes]
    for m in olds:
        m._force_sync = True  # that revision's spelling of force_sync
    stacks = {
        "nn.BatchNorm2d": [nn.BatchNorm2d(s[1]) for s in shapes],
        f"CGBN at {rev}": olds,
        "CGBN now": [CrossGPUBatchNorm2d(s[1], comm=comm, force_sync=True) for s in shapes],
    }

    def run(mods: list[nn.Module]) -> float:
        t0 = time.perf_counter()
        for m, x, g in zip(mods, xs, gs):
            m(x.detach().requires_grad_(True)).backward(g)
        return time.perf_counter() - t0

    for mods in stacks.values():
        run(mods)
    samples: dict[str, list[float]] = {k: [] for k in stacks}
    for _ in range(repeats):
        for k, mods in stacks.items():
            samples[k].append(run(mods))
    ms = {k: 1e3 * summary(v)["median"] for k, v in samples.items()}
    return {
        "rev": rev,
        "ms": ms,
        "now_over_rev": ms["CGBN now"] / ms[f"CGBN at {rev}"],
        "rev_over_bn": ms[f"CGBN at {rev}"] / ms["nn.BatchNorm2d"],
        "now_over_bn": ms["CGBN now"] / ms["nn.BatchNorm2d"],
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=320, help="image side (pixels) for the BN shapes")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--quick", action="store_true", help="N=1 and N=2 only")
    p.add_argument("--worker", action="store_true")
    p.add_argument("--against", metavar="REV", help="only: this layer vs git revision REV, one process")
    a = p.parse_args()
    if a.worker:
        from megdet_hpc.distributed import run_with_comm

        run_with_comm(lambda comm: worker(comm, a.size, a.repeats))
        return 0
    if a.against:
        result = against(a.against, a.size, max(a.repeats, 9))
        print(
            table(
                [{"contender": k, "ms": v} for k, v in result["ms"].items()],
                [("contender", "contender"), ("ms", "ms")],
            )
        )
        print(f"now / {a.against}: {result['now_over_rev']:.3f}")
        print(f"wrote {write_result('cgbn_against', result)}")
        return 0
    rows = []
    for label, launcher, n, env in CONTENDERS:
        if a.quick and n > 2:
            continue
        r = collect(
            launcher, n, [str(HERE), "--worker", "--size", str(a.size), "--repeats", str(a.repeats)], env=env
        )
        t = r["time_s"]
        rows.append(
            {
                "contender": label,
                "N": n,
                "stats": r["stats_comm"],
                "bn_ms": 1e3 * t["bn"]["median"],
                "cgbn_ms": 1e3 * t["one_pass"]["median"],
                "two_pass_ms": 1e3 * t["two_pass"]["median"],
                "cgbn_over_bn": t["one_pass"]["median"] / t["bn"]["median"],
                "two_over_one": t["two_pass"]["median"] / t["one_pass"]["median"],
                "latency_us": 1e6 * r["allreduce_latency_s"]["median"],
                "layers": r["layers"],
                "raw": r,
            }
        )
        print(f"  {label} N={n}: done", flush=True)
    cols = [
        ("contender", "contender"),
        ("N", "N"),
        ("stats", "stats via"),
        ("bn_ms", "BN ms"),
        ("cgbn_ms", "CGBN ms"),
        ("two_pass_ms", "2-pass ms"),
        ("cgbn_over_bn", "CGBN/BN"),
        ("two_over_one", "2-pass/1-pass"),
        ("latency_us", "allreduce us"),
    ]
    print(
        f"\nfwd+bwd over the {rows[0]['layers']} BN layers of ResNet-50 at 2 images of {a.size}px "
        f"(median of {a.repeats}; one thread per rank)\n"
    )
    print(table(rows, cols))
    path = write_result("cgbn", {"size": a.size, "repeats": a.repeats, "rows": rows})
    fig, ax = new_figure((9, 4.5))
    labels = [f"{r['contender']} (N={r['N']})" for r in rows]
    ax.barh(labels, [r["latency_us"] for r in rows])
    ax.set_xscale("log")
    ax.set_xlabel("latency of one CGBN statistics allreduce (us, log)")
    ax.invert_yaxis()
    print(f"\nwrote {path} and {savefig(fig, 'cgbn')}")
    os.environ.pop("MEGDET_CGBN_COMM", None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
