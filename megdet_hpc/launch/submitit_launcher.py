"""Submit training through submitit (Slurm or local executor) as a ``Checkpointable``.

The training itself handles the preemption signal (USR2 by default, as submitit): every rank only
sets a flag, the ranks agree at the next iteration, rank 0 writes the checkpoint and runs
``scontrol requeue``, and the job exits with ``SystemExit`` so submitit writes no result and the
requeued run -- the same pickled ``TrainJob`` -- resumes from the newest checkpoint.  If submitit's
own handler gets the signal first (e.g. the trainer has not installed its handler yet), it calls
``TrainJob.checkpoint()``, which resubmits the same job: resume is automatic from the output dir.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import submitit

from megdet_hpc.engine.signals import EXIT_OK, EXIT_PREEMPTED


@dataclass
class TrainJob(submitit.helpers.Checkpointable):
    config: str
    overrides: list[str] = field(default_factory=list)
    total_batch: int | None = None
    env: dict[str, str] = field(default_factory=dict)

    def argv(self) -> list[str]:
        args = ["--config", self.config]
        if self.total_batch:
            args += ["--total-batch", str(self.total_batch)]
        return args + list(self.overrides)

    def __call__(self) -> int:
        os.environ.update(self.env)
        from megdet_hpc.train import main

        code = main(self.argv())
        if code == EXIT_PREEMPTED and os.environ.get("SLURM_JOB_ID"):
            # Checkpoint written and job requeued: leave without a result so submitit waits for the
            # requeued run (submitit's own handler exits the same way).
            sys.exit(-1)
        if code != EXIT_OK:
            raise RuntimeError(f"megdet_hpc.train exited with status {code}")
        return code

    def checkpoint(self, *args: Any, **kwargs: Any) -> submitit.helpers.DelayedSubmission:
        return submitit.helpers.DelayedSubmission(
            TrainJob(self.config, self.overrides, self.total_batch, self.env)
        )


def make_executor(folder: Path, local: bool, *, nodes: int, gpus_per_node: int, tasks_per_node: int,
                  timeout_min: int, partition: str, account: str, cpus_per_task: int,
                  signal_delay_s: int, job_name: str, setup: list[str]) -> submitit.Executor:  # fmt: skip
    if local:
        executor: submitit.Executor = submitit.LocalExecutor(folder=folder)
        executor.update_parameters(timeout_min=timeout_min, tasks_per_node=tasks_per_node, nodes=1,
                                   gpus_per_node=gpus_per_node)  # fmt: skip
        return executor
    executor = submitit.SlurmExecutor(folder=folder, max_num_timeout=30)
    params: dict[str, Any] = {
        "nodes": nodes,
        "ntasks_per_node": tasks_per_node,
        "cpus_per_task": cpus_per_task,
        "time": timeout_min,
        "job_name": job_name,
        "signal_delay_s": signal_delay_s,
        "setup": setup,
        "additional_parameters": {"requeue": True},
    }
    if gpus_per_node:
        params["gpus_per_node"] = gpus_per_node
    if partition:
        params["partition"] = partition
    if account:
        params["account"] = account
    executor.update_parameters(**params)
    return executor
