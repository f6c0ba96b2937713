"""Exercises every Comm primitive on a real multi-process job; every rank reports (``write_report``)."""

from __future__ import annotations

import torch

from megdet_hpc import distributed
from megdet_hpc.distributed.comm import Comm
from megdet_hpc.distributed.grad_sync import make_gradient_sync
from megdet_hpc.launch.local import write_report


def waiting_during_backward(comm: Comm) -> list[str | None]:
    """What ``comm.waiting`` reads in the middle of a backward pass of the backend's gradient path
    (an accumulating micro-step, then the last one): the collective the stall watchdog would name if a
    peer froze there."""
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 1))
    sync = make_gradient_sync(comm, model, torch.optim.SGD(model.parameters(), lr=0.1), accum=2)
    seen: list[str | None] = []
    # Read from a hook on the first layer's output: it runs in the middle of backward.

    def mark_on_backward(_module: torch.nn.Module, _inputs: object, out: torch.Tensor) -> None:
        out.register_hook(lambda _grad: seen.append(comm.waiting))

    model[0].register_forward_hook(mark_on_backward)
    for last in (False, True):
        with sync.accumulate(last), sync.reducing(last):
            sync.forward_model(torch.ones(2, 3)).sum().backward()
    sync.discard()
    return seen


def main(comm: Comm) -> None:
    r, n = comm.rank, comm.size
    t = torch.full((5,), float(r + 1))
    comm.allreduce_(t)
    pair = comm.contiguous_group(2)
    p = torch.full((3,), float(r + 1))
    comm.allreduce_(p, pair)
    # Coalesced (the gradient path): mixed dtypes, a channels_last 4-D tensor, a non-contiguous view;
    # values differ per element so a layout mix-up shows.
    base = torch.arange(2 * 3 * 4 * 5, dtype=torch.float32).reshape(2, 3, 4, 5)
    many = [
        (base + r).contiguous(memory_format=torch.channels_last),
        torch.full((7,), float(r), dtype=torch.float64),
        (torch.arange(12.0).reshape(3, 4) * (r + 1)).t(),
    ]
    comm.allreduce_coalesced_(many)
    coalesced_ok = (
        torch.equal(many[0], base * n + n * (n - 1) / 2)
        and many[0].is_contiguous(memory_format=torch.channels_last)
        and torch.equal(many[1], torch.full((7,), n * (n - 1) / 2, dtype=torch.float64))
        and torch.equal(many[2], (torch.arange(12.0).reshape(3, 4) * (n * (n + 1) / 2)).t())
    )
    pair_many = [torch.full((2, 2), float(r + 1))]
    comm.allreduce_coalesced_(pair_many, pair)
    b = torch.full((4,), float(r))
    comm.broadcast_(b, root=n - 1)
    objs = comm.allgather_object({"rank": r})
    bobj = comm.broadcast_object({"from": r} if r == 0 else None, root=0)
    comm.barrier()
    calls = dict(comm.counters.calls)
    backward_marks = waiting_during_backward(comm)
    stats = distributed.stats_comm()
    report = {
        "backend": comm.name,
        "rank": r,
        "size": n,
        "allreduce": t.tolist(),
        "pair": p.tolist(),
        "pair_ranks": list(pair.ranks) if pair else None,
        "broadcast": b.tolist(),
        "coalesced_ok": coalesced_ok,
        "pair_coalesced": pair_many[0].flatten().tolist(),
        "objs": objs,
        "bobj": bobj,
        "stats_comm": stats.name,
        "calls": calls,
        "backward_marks": backward_marks,
    }
    write_report(r, report)


if __name__ == "__main__":
    distributed.run_with_comm(main)
