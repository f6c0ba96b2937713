"""A rank that trains one DDP step with its model in a function's frame, run by ``run_with_comm`` as
the entry points run theirs: ``returns`` (the frame is gone, the model in a reference cycle) or
``raises`` (the failure's traceback keeps the frame, and the model, alive).  torchvision is imported
after the torch group exists, as in ``megdet_hpc.train``.  What stays running at exit is recorded by
``tests/exit_probe``."""

from __future__ import annotations

import contextlib
import sys

import torch

from megdet_hpc import distributed


class Failed(RuntimeError):
    pass


def train_a_step(fail: bool) -> None:
    # MEGDET_CGBN_COMM=torch-gloo under mpirun: the torch default group is the statistics' own.
    distributed.stats_comm().allreduce_(torch.ones(3))
    import torchvision  # noqa: F401 - imports torch.distributed.nn.functional (through torch._dynamo)
    from torch.nn.parallel import DistributedDataParallel

    model = DistributedDataParallel(torch.nn.Linear(4, 2))
    model(torch.ones(2, 4)).sum().backward()
    # In a reference cycle, as a training run's objects are (trainer <-> hooks): only the cycle
    # collector frees it, and it may not run again before the interpreter finalises.
    run = {"model": model}
    run["self"] = run
    if fail:
        raise Failed("a step failed")


def main() -> None:
    with contextlib.suppress(Failed):  # after run_with_comm's shutdown: what the entry points do
        distributed.run_with_comm(lambda _comm: train_a_step(fail=sys.argv[1] == "raises"))


if __name__ == "__main__":
    main()
