"""Collectives and bytes per training iteration vs world size: our CGBN vs an all-gather SyncBN.

Counted from the code path actually taken: a real R50-FPN training step (small images, synthetic
data) under ``mpirun -np N`` for N = 2 and 4 with every collective going through ``Comm`` (the mpi
backend carries CGBN statistics, the gradient allreduce and the per-step vote), read from
``Comm.counters``.  The formula (which must match the counts) extrapolates to N = 128 and is
compared with torch's SyncBatchNorm design (forward all-gather of N x (2C+1), backward allreduce of
2C).  Wire bytes per rank use the ring model: allreduce 2(N-1)/N x payload, all-gather (N-1) x payload.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from common import REPO, collect, new_figure, savefig, table, timing_run, write_result

HERE = Path(__file__).resolve()


def worker(comm: Any) -> None:
    from megdet_hpc.data.synthetic import generate
    from megdet_hpc.launch.local import write_report
    from megdet_hpc.layers import CrossGPUBatchNorm2d

    data = generate(REPO / "datasets" / "synthetic", 400, 100, 128, 0)
    overrides = [
        "model.num_classes=3",
        "model.min_size=128",
        "model.max_size=128",
        "data.images_per_gpu=1",
        f"solver.total_batch={comm.size}",
        "data.num_workers=0",
        "solver.amp=off",
        f"data.train_images={data}/train",
        f"data.train_annotations={data}/annotations/instances_train.json",
    ]
    trainer = timing_run(REPO / "configs/megdet_r50_fpn_bs16.yaml", overrides, comm).trainer
    trainer.run_step()
    comm.counters.reset(keep_log=True)
    trainer.run_step()
    channels = [m.num_features for m in trainer.model.modules() if isinstance(m, CrossGPUBatchNorm2d)]
    params = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    if comm.rank == 0:
        write_report(0, {"size": comm.size, "log": comm.counters.log, "channels": channels, "params": params})


def formula(channels: list[int], params: int, n: int, design: str) -> dict[str, float]:
    """Collectives, payload elements and wire bytes per rank for one iteration."""
    if n == 1:
        return {
            "calls": 0,
            "cgbn_calls": 0,
            "cgbn_wire_bytes": 0.0,
            "grad_wire_bytes": 0.0,
            "wire_bytes": 0.0,
        }
    ring_ar = 2 * (n - 1) / n
    if design == "cgbn":
        cg = sum(ring_ar * ((2 * c + 1) * 8 + 2 * c * 4) for c in channels)
    else:  # torch SyncBatchNorm: all-gather N x (2C+1) float32 forward, allreduce 2C backward
        cg = sum((n - 1) * (2 * c + 1) * 4 + ring_ar * 2 * c * 4 for c in channels)
    grad = ring_ar * params * 4
    vote = ring_ar * 7 * 8  # [non-finite, stop, checkpoint-time, 4 losses] float64
    return {
        "calls": 2 * len(channels) + 2,
        "cgbn_calls": 2 * len(channels),
        "cgbn_wire_bytes": cg,
        "grad_wire_bytes": grad,
        "wire_bytes": cg + grad + vote,
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--worker", action="store_true")
    a = p.parse_args()
    if a.worker:
        from megdet_hpc.distributed import run_with_comm

        run_with_comm(worker)
        return 0
    counted = {n: collect("mpirun", n, [str(HERE), "--worker"]) for n in (2, 4)}
    channels, params = counted[2]["channels"], counted[2]["params"]
    check = []
    for n, r in counted.items():
        log = r["log"]
        sizes = {2 * c + 1 for c in channels} | {2 * c for c in channels}
        cg = [e for e in log if e[1] in sizes]
        grads = [e for e in log if e[1] == params]
        f = formula(channels, params, n, "cgbn")
        check.append(
            {
                "N": n,
                "counted_calls": len(log),
                "formula_calls": f["calls"],
                "counted_cgbn_calls": len(cg),
                "formula_cgbn_calls": f["cgbn_calls"],
                "grad_elements": sum(e[1] for e in grads),
                "params": params,
                "cgbn_elements": sum(e[1] for e in cg),
                "formula_cgbn_elements": sum(4 * c + 1 for c in channels),
            }
        )
        assert len(log) == f["calls"] and len(cg) == f["cgbn_calls"], (n, len(log), f)
    print("counted on the real code path (one iteration, R50-FPN, mpirun):")
    print(table(check, [(k, k) for k in check[0]]))
    rows = []
    for n in (1, 2, 4, 8, 16, 32, 64, 128):
        ours, torch_design = formula(channels, params, n, "cgbn"), formula(channels, params, n, "allgather")
        rows.append(
            {
                "N": n,
                "collectives": ours["calls"],
                "cgbn_KiB": ours["cgbn_wire_bytes"] / 1024,
                "allgather_syncbn_KiB": torch_design["cgbn_wire_bytes"] / 1024,
                "ratio": torch_design["cgbn_wire_bytes"] / ours["cgbn_wire_bytes"] if n > 1 else None,
                "grad_MiB": ours["grad_wire_bytes"] / 2**20,
                "total_MiB_ours": ours["wire_bytes"] / 2**20,
                "total_MiB_allgather": torch_design["wire_bytes"] / 2**20,
            }
        )
    print(
        f"\nper iteration and rank ({len(channels)} CGBN layers, sum C = {sum(channels)}, {params / 1e6:.1f}M params):"
    )
    print(
        table(
            rows,
            [
                ("N", "N"),
                ("collectives", "collectives"),
                ("cgbn_KiB", "CGBN wire KiB"),
                ("allgather_syncbn_KiB", "all-gather SyncBN KiB"),
                ("ratio", "ratio"),
                ("grad_MiB", "grad MiB"),
                ("total_MiB_ours", "total MiB"),
                ("total_MiB_allgather", "total MiB (all-gather)"),
            ],
        )
    )
    path = write_result("comm_volume", {"counted": check, "extrapolated": rows})
    fig, ax = new_figure((7, 4))
    ns = [r["N"] for r in rows[1:]]
    ax.plot(ns, [r["cgbn_KiB"] for r in rows[1:]], "o-", label="CGBN (allreduce 2C+1 / 2C)")
    ax.plot(ns, [r["allgather_syncbn_KiB"] for r in rows[1:]], "s-", label="all-gather SyncBN (torch design)")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("ranks N")
    ax.set_ylabel("BN statistics on the wire per rank per iteration (KiB)")
    ax.legend()
    print(f"wrote {path} and {savefig(fig, 'comm_volume')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
