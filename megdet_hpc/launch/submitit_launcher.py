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
import pickle
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import submitit

from megdet_hpc.launch.resources import ResourceError, SlurmResources
from megdet_hpc.launch.slurm import job_gone
from megdet_hpc.utils.cli import EXIT_OK, EXIT_PREEMPTED


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


def slurm_parameters(res: SlurmResources) -> dict[str, Any]:
    """submitit's SlurmExecutor parameters for ``res`` (also what ``--dry-run`` renders).  submitit
    always sends USR2 (``SlurmJobEnvironment.USR_SIG``), so other signals are refused."""
    if res.signal != "USR2":
        raise ResourceError(
            f"--signal {res.signal}: submitit always sends USR2 (use launch sbatch for others)"
        )
    params: dict[str, Any] = {
        "nodes": res.nodes,
        "ntasks_per_node": res.tasks_per_node,
        "cpus_per_task": res.cpus_per_task,
        "time": res.time_minutes,
        "job_name": res.job_name,
        "signal_delay_s": res.signal_lead_s,
        "setup": list(res.setup),
        "additional_parameters": {"requeue": True},
    }
    if res.gpus_per_node:
        params["gpus_per_node"] = res.gpus_per_node
    if res.partition:
        params["partition"] = res.partition
    if res.account:
        params["account"] = res.account
    return params


def make_executor(folder: Path, local: bool, res: SlurmResources) -> submitit.Executor:
    if local:
        executor: submitit.Executor = submitit.LocalExecutor(folder=folder)
        executor.update_parameters(
            timeout_min=res.time_minutes,
            tasks_per_node=res.tasks_per_node,
            nodes=1,
            gpus_per_node=res.gpus_per_node,
        )
        return executor
    executor = submitit.SlurmExecutor(folder=folder, max_num_timeout=30)
    executor.update_parameters(**slurm_parameters(res))
    return executor


def sbatch_preview(folder: Path, res: SlurmResources) -> str:
    """The sbatch script submitit would submit (its own renderer)."""
    from submitit.slurm.slurm import _make_sbatch_string

    return _make_sbatch_string(
        command="python -u -m submitit.core._submit <folder>", folder=folder, **slurm_parameters(res)
    )


def follow(job: submitit.Job, local: bool) -> int:
    """Wait until every task has written its result (a requeued run keeps the job waiting); 0 when
    all succeeded."""
    tasks = [job.task(i) for i in range(job.num_tasks)] if job.num_tasks > 1 else [job]
    while not all(t.paths.result_pickle.exists() for t in tasks):
        if job.done() if local else job_gone(str(job.job_id)):
            time.sleep(3)  # results are written just before the job leaves the queue
            if not all(t.paths.result_pickle.exists() for t in tasks):
                print(f"job {job.job_id} ended without a result; see {job.paths.stderr}", file=sys.stderr)
                return 1
        time.sleep(1)
    failed = []
    for t in tasks:
        with open(t.paths.result_pickle, "rb") as fh:
            outcome, value = pickle.load(fh)
        if outcome != "success" or value != 0:
            failed.append(str(value).strip().splitlines()[-1] if str(value).strip() else outcome)
    if failed:
        print(f"job {job.job_id} failed: {failed[0]}", file=sys.stderr)
        return 1
    print(f"job {job.job_id} finished: {len(tasks)} task(s) succeeded")
    return 0
