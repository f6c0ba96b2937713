"""Checkpoint cost at R50-FPN size: synchronous save vs background save, and the training stall.

The state is a real Faster R-CNN R50-FPN model + SGD momentum (what the trainer saves).  Contenders,
interleaved: ``sync`` (write + fsync + manifest on the training thread) and ``background`` (CPU snapshot
on the training thread, write on a worker thread).  The stall is the time the training thread is
blocked; it is compared with a training-step period measured here for the same model.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from common import new_figure, savefig, summary, table, write_result


def main() -> int:
    import torch

    from megdet_hpc.checkpoint import Checkpointer
    from megdet_hpc.config import load_config
    from megdet_hpc.distributed.single import SingleProcessComm
    from megdet_hpc.modeling import build_model

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--step-period", type=float, default=0.0, help="seconds; default: measure a CPU step")
    a = p.parse_args()
    torch.set_num_threads(1)
    cfg = load_config(None, ["model.num_classes=80", "model.min_size=256", "model.max_size=256"])
    model = build_model(cfg)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    images = [torch.rand(3, 256, 256) for _ in range(2)]
    targets = [{"boxes": torch.tensor([[10.0, 20.0, 100.0, 120.0]]), "labels": torch.tensor([1])}] * 2
    step_times = []
    for _ in range(3):  # also creates the momentum buffers
        t0 = time.perf_counter()
        loss = sum(model(images, targets).values())
        opt.zero_grad()
        loss.backward()
        opt.step()
        step_times.append(time.perf_counter() - t0)
    step_period = a.step_period or min(step_times)
    state = {"model": model.state_dict(), "optimizer": opt.state_dict(), "iteration": 1}
    size = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    size += sum(v.numel() * v.element_size() for s in opt.state_dict()["state"].values() for v in s.values())
    comm = SingleProcessComm()
    results: dict[str, dict[str, list[float]]] = {
        "sync": {"stall": [], "write": []},
        "background": {"stall": [], "write": []},
    }
    with tempfile.TemporaryDirectory() as tmp:
        for rep in range(a.repeats):
            for mode in ("sync", "background"):
                ck = Checkpointer(Path(tmp) / mode, comm, keep=2, background=mode == "background")
                ck.save(rep + 1, state, {"iteration": rep + 1})
                results[mode]["stall"].append(ck.last_stall_s)
                ck.wait()
                results[mode]["write"].append(ck.last_write_s)
    rows = []
    for mode, r in results.items():
        stall = summary(r["stall"])["median"]
        rows.append(
            {
                "mode": mode,
                "state_MiB": size / 2**20,
                "stall_s": stall,
                "write_s": summary(r["write"])["median"],
                "stall_pct_of_step": 100 * stall / step_period,
            }
        )
    print(
        f"R50-FPN checkpoint ({size / 2**20:.0f} MiB incl. momentum); step period {step_period:.2f} s "
        f"(CPU, 1 thread, 2 x 256 px{', given' if a.step_period else ''})"
    )
    print(
        table(
            rows,
            [
                ("mode", "mode"),
                ("state_MiB", "MiB"),
                ("stall_s", "stall s"),
                ("write_s", "write s"),
                ("stall_pct_of_step", "stall % of one step"),
            ],
        )
    )
    path = write_result("checkpoint", {"rows": rows, "step_period_s": step_period, "raw": results})
    fig, ax = new_figure((6, 3))
    ax.bar([r["mode"] for r in rows], [r["stall_s"] for r in rows])
    ax.axhline(0.05 * step_period, color="C3", ls="--", label="5% of a step")
    ax.set_ylabel("training-thread stall per save (s)")
    ax.legend()
    print(f"wrote {path} and {savefig(fig, 'checkpoint')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
