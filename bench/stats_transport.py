"""What one CGBN statistics allreduce costs the host, per transport, side by side in one job.

``python bench/stats_transport.py`` launches 2 ranks under ``horovodrun --mpi`` (so Horovod, mpi4py
and a torch.distributed gloo group -- ``MEGDET_CGBN_COMM=torch-gloo``, NCCL's CPU stand-in -- all live
in the same processes) and under ``horovodrun --gloo``, once per ``HOROVOD_CYCLE_TIME`` (Horovod reads
it at ``hvd.init``).  Each contender reduces the layer's forward payload (2C+1 float32, C=256) with
``torch.utils.benchmark.Timer.timeit`` (a fixed count, so the ranks stay in lockstep), interleaved in
one process; the table gives microseconds per call and the ratio to the current default
(``hvd.allreduce_`` with the layer's stable name).

Two kinds of row:
  * *complete*: the call returns with the result -- what a layer that consumes its statistics next
    pays (``hvd.allreduce_`` is literally ``synchronize(allreduce_async_(...))``).
  * *issue*: only the call that queues the collective (``allreduce_async_``; ``async_op=True``), the
    wait after the timed loop.  On a GPU an NCCL collective through torch.distributed costs the host
    only this (the stream orders the consumer); Horovod's handle must still be synchronized before
    the consumer is launched, because Horovod makes the torch stream wait on its NCCL event only in the
    completion callback (``horovod/torch/mpi_ops_v2.cc``, ``DoAllreduce``).

Writes bench/results/stats_transport.json and .md.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path
from typing import Any

import torch
from common import REPO, collect, table, write_result

HERE = Path(__file__).resolve()
NUMBER = int(os.environ.get("MEGDET_BENCH_NUMBER", "300"))
BLOCKS = 5  # median of 5 block means
PAYLOAD = 2 * 256 + 1

# (label, launcher, env)
RUNS = [
    ("hvd-mpi, default cycle", "hvd-mpi", {}),
    ("hvd-mpi, HOROVOD_CYCLE_TIME=0.1", "hvd-mpi", {"HOROVOD_CYCLE_TIME": "0.1"}),
    ("hvd-mpi, HOROVOD_CYCLE_TIME=5", "hvd-mpi", {"HOROVOD_CYCLE_TIME": "5"}),
    ("hvd-gloo, default cycle", "hvd-gloo", {}),
]


def worker(comm: Any) -> None:
    import horovod.torch as hvd
    from torch.utils.benchmark import Timer

    from megdet_hpc.launch.local import write_report

    hvd_ = hvd
    t = torch.zeros(PAYLOAD)
    contenders: dict[str, tuple[str, object]] = {}  # label -> (kind, callable)

    def named() -> None:
        hvd_.allreduce_(t, op=hvd_.Sum, name="bench.stats")

    def unnamed() -> None:
        hvd_.allreduce_(t, op=hvd_.Sum)  # a fresh auto-generated name per call: response-cache misses

    def async_sync() -> None:
        hvd_.synchronize(hvd_.allreduce_async_(t, op=hvd_.Sum, name="bench.stats"))

    def async_poll() -> None:
        h = hvd_.allreduce_async_(t, op=hvd_.Sum, name="bench.stats")
        while not hvd_.poll(h):
            pass
        hvd_.synchronize(h)

    pending: list = []

    def hvd_issue() -> None:
        pending.append(hvd_.allreduce_async_(t, op=hvd_.Sum, name=f"bench.issue.{len(pending)}"))

    contenders["horovod allreduce_ (stable name)"] = ("complete", named)
    contenders["horovod allreduce_ (no name)"] = ("complete", unnamed)
    contenders["horovod allreduce_async_ + synchronize"] = ("complete", async_sync)
    contenders["horovod allreduce_async_ + poll loop"] = ("complete", async_poll)
    contenders["horovod allreduce_async_ (issue only)"] = ("issue", hvd_issue)

    if comm.env.is_mpi:
        from megdet_hpc.distributed.mpi_comm import MPIComm

        mpi = MPIComm(comm.env, other_mpi_threads=True)
        contenders["mpi4py Allreduce (MEGDET_CGBN_COMM=mpi)"] = ("complete", lambda: mpi.allreduce_(t))

    import torch.distributed as dist

    from megdet_hpc.distributed.stats_group import TorchStatsComm

    group = TorchStatsComm(comm, "gloo")
    works: list = []
    contenders["torch gloo group all_reduce (torch-gloo)"] = ("complete", lambda: group.allreduce_(t))
    contenders["torch gloo group, async_op (issue only)"] = (
        "issue",
        lambda: works.append(dist.all_reduce(t, group=group.pg, async_op=True)),
    )

    def drain() -> None:
        for h in pending:
            hvd_.synchronize(h)
        pending.clear()
        for w in works:
            w.wait()
        works.clear()

    for _kind, fn in contenders.values():  # warm: Horovod's response cache, gloo's pairs
        for _ in range(20):
            fn()
        drain()
    blocks: dict[str, list[float]] = {label: [] for label in contenders}
    for _ in range(BLOCKS):  # round-robin: every contender sees the same machine noise
        for label, (_kind, fn) in contenders.items():
            comm.barrier()
            blocks[label].append(Timer(stmt="fn()", globals={"fn": fn}).timeit(NUMBER // BLOCKS).mean)
            drain()
    rows = [
        {"contender": label, "kind": kind, "us": statistics.median(blocks[label]) * 1e6}
        for label, (kind, _fn) in contenders.items()
    ]
    if comm.rank == 0:
        write_report(
            0,
            {
                "rows": rows,
                "load_average": os.getloadavg(),
                "cycle_time": os.environ.get("HOROVOD_CYCLE_TIME", "default (1 ms)"),
            },
        )
    group.shutdown()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--worker", action="store_true")
    a = p.parse_args()
    if a.worker:
        from megdet_hpc.distributed import run_with_comm

        run_with_comm(worker)
        return
    runs = []
    for label, launcher, env in RUNS:
        rep = collect(
            launcher, 2, [str(HERE), "--worker"], env={"MEGDET_CGBN_COMM": "main", **env}, timeout=900
        )
        base = next(r["us"] for r in rep["rows"] if r["contender"] == "horovod allreduce_ (stable name)")
        for r in rep["rows"]:
            r["run"] = label
            r["load_average_1min"] = rep["load_average"][0]
            r["vs_default"] = r["us"] / base
        runs.extend(rep["rows"])
        print(f"{label}: done", file=sys.stderr)
    cols = [
        ("run", "launch"),
        ("contender", "contender"),
        ("kind", "kind"),
        ("us", "us/call"),
        ("vs_default", "x default"),
    ]
    text = table(runs, cols)
    print(text)
    write_result("stats_transport", {"payload_floats": PAYLOAD, "number": NUMBER, "ranks": 2, "rows": runs})
    loads = ", ".join(sorted({f"{r['load_average_1min']:.0f}" for r in runs}))
    md = [
        "# CGBN statistics allreduce: host cost per call (CPU, 2 ranks, 2C+1 = 513 float32)",
        "",
        f"`python bench/stats_transport.py` (torch.utils.benchmark, {NUMBER} calls per contender, interleaved in one job per launch).",
        "x default = ratio to `hvd.allreduce_` with a stable name (the current default) in the same job.",
        f"1-min load average during the launches: {loads}"
        " (2 cores): absolute times are mostly scheduling; the ordering is what carries over.",
        "",
        "| launch | contender | kind | us/call | x default |",
        "|---|---|---|---|---|",
        *(
            f"| {r['run']} | {r['contender']} | {r['kind']} | {r['us']:.0f} | {r['vs_default']:.2f} |"
            for r in runs
        ),
    ]
    (REPO / "bench" / "results" / "stats_transport.md").write_text("\n".join(md) + "\n")


if __name__ == "__main__":
    main()
