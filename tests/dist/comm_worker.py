"""Exercises every Comm primitive on a real multi-process job; writes OUT/rank{r}.json."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from megdet_hpc import dist


def main(out: Path) -> None:
    comm = dist.init()
    r, n = comm.rank, comm.size
    t = torch.full((5,), float(r + 1))
    comm.allreduce_(t)
    pair = comm.contiguous_group(2)
    p = torch.full((3,), float(r + 1))
    comm.allreduce_(p, pair)
    b = torch.full((4,), float(r))
    comm.broadcast_(b, root=n - 1)
    objs = comm.allgather_object({"rank": r})
    bobj = comm.broadcast_object({"from": r} if r == 0 else None, root=0)
    comm.barrier()
    stats = dist.stats_comm()
    report = {
        "backend": comm.name,
        "rank": r,
        "size": n,
        "allreduce": t.tolist(),
        "pair": p.tolist(),
        "pair_ranks": list(pair.ranks) if pair else None,
        "broadcast": b.tolist(),
        "objs": objs,
        "bobj": bobj,
        "stats_comm": stats.name,
        "calls": dict(comm.counters.calls),
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / f"rank{r}.json").write_text(json.dumps(report))
    dist.shutdown()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
