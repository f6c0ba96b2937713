"""Training-step throughput: megdet_hpc vs a plain torchvision loop, CGBN vs local BN, weak scaling.

``python bench/train_step.py`` runs, on the demo model (ResNet-18 FPN, 128 px, 2 images per rank, one
thread per rank, the same synthetic data through the same loader):
  * N=1, in one process: our step (``SimpleTrainer.run_step``: vote, sampling keys, LR, gradient sync) vs the plain
    torchvision loop (``model(images, targets)`` -> sum -> backward -> SGD step), interleaved blocks;
  * N=2 under ``horovodrun --mpi`` (Horovod: overlapped DistributedOptimizer, CGBN statistics through
    Horovod) and under ``mpirun`` (mpi backend: mpi4py statistics, in-place gradient allreduce after
    backward): our step with CGBN vs with local BN (and Horovod fp16 compression), trainers in one
    process, interleaved; weak scaling = throughput(N=2) / (2 x throughput(N=1)) per launcher.
Prints a table, writes bench/results/train_step.json and train_step.png.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from common import REPO, collect, new_figure, savefig, summary, table, timing_run, write_result

HERE = Path(__file__).resolve()


def make_trainer(norm: str, world: int, comm, *extra: str):  # type: ignore[no-untyped-def]
    from megdet_hpc.data.synthetic import generate

    data = generate(REPO / "datasets" / "synthetic", 400, 100, 128, 0)
    overrides = [
        f"model.norm={norm}",
        "data.num_workers=0",
        "train.threads=1",
        f"solver.total_batch={2 * world}",
        f"data.train_images={data}/train",
        f"data.train_annotations={data}/annotations/instances_train.json",
        *extra,
    ]
    return timing_run(REPO / "configs/demo_cpu.yaml", overrides, comm).trainer


def worker(comm: Any, iters: int, blocks: int) -> None:
    import torch

    from megdet_hpc import distributed
    from megdet_hpc.data.prefetch import DevicePrefetcher
    from megdet_hpc.launch.local import write_report

    samples: dict[str, list[float]] = {}

    def step(trainer) -> None:  # type: ignore[no-untyped-def]
        assert not trainer.run_step().skipped, "non-finite step: the timing would not be a training step"

    if comm.size == 1:
        trainer = make_trainer("cgbn", 1, comm)
        data = DevicePrefetcher(iter(trainer.loader), trainer.device)
        # Same model, same data stream, same SGD hyper-parameters; the LR follows the same warmup.
        plain_opt = torch.optim.SGD(trainer.model.parameters(), lr=1e-4, momentum=0.9, weight_decay=1e-4)

        def plain() -> None:
            images, targets, _ = next(data)
            for group in plain_opt.param_groups:
                group["lr"] = trainer.schedule.lr(trainer.progress.images_seen)
            losses = trainer.model(images, targets)
            plain_opt.zero_grad()
            sum(losses.values()).backward()
            plain_opt.step()

        contenders = {"plain torchvision loop": plain, "megdet_hpc step": lambda: step(trainer)}
    else:
        cg = make_trainer("cgbn", comm.size, comm)
        bn = make_trainer("bn", comm.size, comm)
        contenders = {
            "megdet_hpc step, CGBN": lambda: step(cg),
            "megdet_hpc step, local BN": lambda: step(bn),
        }
        if comm.name == "horovod":
            fp16 = make_trainer("cgbn", comm.size, comm, "solver.fp16_compression=true")
            contenders["megdet_hpc step, CGBN + fp16 gradients"] = lambda: step(fp16)
    for fn in contenders.values():  # warm-up
        for _ in range(3):
            fn()
    for _ in range(blocks):
        for name, fn in contenders.items():
            comm.barrier()
            t0 = time.perf_counter()
            for _ in range(iters):
                fn()
            samples.setdefault(name, []).append((time.perf_counter() - t0) / iters)
    if comm.rank == 0:
        write_report(
            0,
            {
                "world": comm.size,
                "comm": comm.name,
                "stats_comm": distributed.stats_comm().name,
                "gradient_path": cg.grad_sync.describe() if comm.size > 1 else "",
                "s_per_iter": {k: summary(v) for k, v in samples.items()},
            },
        )


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--iters", type=int, default=10, help="iterations per timed block")
    p.add_argument("--blocks", type=int, default=6)
    p.add_argument("--worker", action="store_true")
    a = p.parse_args()
    if a.worker:
        from megdet_hpc.distributed import run_with_comm

        run_with_comm(lambda comm: worker(comm, a.iters, a.blocks))
        return 0
    runs = {}
    for launcher, n in (("single", 1), ("hvd-mpi", 2), ("mpirun", 2)):
        runs[launcher] = collect(
            launcher, n, [str(HERE), "--worker", "--iters", str(a.iters), "--blocks", str(a.blocks)]
        )
    rows = []
    for launcher, r in runs.items():
        n = r["world"]
        for name, s in r["s_per_iter"].items():
            rows.append(
                {
                    "launcher": launcher,
                    "N": n,
                    "contender": name,
                    "s_per_iter": s["median"],
                    "images_per_s": 2 * n / s["median"],
                    "spread": f"{s['p25']:.3f}-{s['p75']:.3f}",
                }
            )
    one = runs["single"]["s_per_iter"]
    ratio_plain = one["plain torchvision loop"]["median"] / one["megdet_hpc step"]["median"]

    def weak(launcher: str, contender: str = "megdet_hpc step, CGBN") -> float:
        """throughput(N=2) / (2 x throughput(N=1)); 2 images per rank in both."""
        return one["megdet_hpc step"]["median"] / runs[launcher]["s_per_iter"][contender]["median"]

    def overhead(launcher: str) -> float:
        two = runs[launcher]["s_per_iter"]
        return two["megdet_hpc step, CGBN"]["median"] / two["megdet_hpc step, local BN"]["median"] - 1

    per_launcher = {
        launcher: {
            "comm": runs[launcher]["comm"],
            "gradient_path": runs[launcher]["gradient_path"],
            "weak_scaling_efficiency": weak(launcher),
            "cgbn_overhead": overhead(launcher),
        }
        for launcher in ("hvd-mpi", "mpirun")
    }
    per_launcher["hvd-mpi"]["weak_scaling_efficiency_fp16"] = weak(
        "hvd-mpi", "megdet_hpc step, CGBN + fp16 gradients"
    )
    print(
        table(
            rows,
            [
                ("launcher", "launcher"),
                ("N", "N"),
                ("contender", "contender"),
                ("s_per_iter", "s/iter (median)"),
                ("spread", "p25-p75"),
                ("images_per_s", "images/s"),
            ],
        )
    )
    print(f"\nour step vs plain loop (throughput ratio, N=1): {ratio_plain:.3f}  (target >= 1.0)")
    for launcher, r in per_launcher.items():
        print(f"{launcher} ({r['comm']}; {r['gradient_path']}):")
        print(f"  CGBN overhead vs local BN at N=2: {100 * r['cgbn_overhead']:+.1f}%  (target <= 5%)")
        print(
            f"  weak scaling efficiency 1 -> 2 ranks (CGBN): {r['weak_scaling_efficiency']:.3f}  (target >= 0.85)"
        )
    print(
        f"  (hvd-mpi with Horovod fp16 gradient compression: {per_launcher['hvd-mpi']['weak_scaling_efficiency_fp16']:.3f})"
    )
    path = write_result(
        "train_step", {"rows": rows, "ours_vs_plain": ratio_plain, "per_launcher": per_launcher, "runs": runs}
    )
    fig, ax = new_figure((8, 3.5))
    ax.barh(
        [f"{r['launcher']} N={r['N']}: {r['contender']}" for r in rows], [r["images_per_s"] for r in rows]
    )
    ax.set_xlabel("images/s (demo model, CPU, 1 thread per rank)")
    ax.invert_yaxis()
    print(f"wrote {path} and {savefig(fig, 'train_step')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
