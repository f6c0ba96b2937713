"""``python -m megdet_hpc.launch --nodes N --gpus-per-node G --config C [overrides]``

Submits the training through submitit's Slurm executor (``--local``: submitit's local executor),
prints the job id and log paths, and with ``--wait`` follows the job and returns its exit status.
``--dry-run`` prints the sbatch script submitit would submit and the training command, without
submitting.  CPU-only: ``--gpus-per-node 0 --tasks-per-node K``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from megdet_hpc.config import ConfigError, load_config, scale_to_total_batch


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="megdet_hpc.launch", description="Submit MegDet training via submitit")
    p.add_argument("--config", required=True)
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--tasks-per-node", type=int, help="default: gpus-per-node (1 if 0)")
    p.add_argument("--images-per-gpu", type=int, help="default: the config's data.images_per_gpu")
    p.add_argument("--partition", default="")
    p.add_argument("--account", default="")
    p.add_argument("--timeout", type=int, default=24 * 60, help="minutes")
    p.add_argument("--cpus-per-task", type=int, default=8)
    p.add_argument("--signal-delay", type=int, default=120, help="seconds before the limit (USR2)")
    p.add_argument("--job-name", default="megdet")
    p.add_argument("--folder", type=Path, default=Path("logs/submitit"), help="submitit job folder")
    p.add_argument("--setup", action="append", default=[], help="shell line run before the job")
    p.add_argument("--local", action="store_true", help="submitit's local executor (no Slurm)")
    p.add_argument("--dry-run", action="store_true")
    p.add_argument("--wait", action="store_true")
    p.add_argument("opts", nargs="*", help="config overrides section.key=value")
    return p


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    try:
        return _main(a)
    except (ConfigError, ValueError) as exc:
        print(f"megdet_hpc.launch: error: {exc}", file=sys.stderr)
        return 2


def _main(a: argparse.Namespace) -> int:
    from megdet_hpc.launch.submitit_launcher import TrainJob, make_executor

    tasks = a.tasks_per_node or max(a.gpus_per_node, 1)
    if a.nodes < 1 or tasks < 1 or a.timeout < 1:
        raise ValueError("--nodes, --tasks-per-node and --timeout must be >= 1")
    cfg = load_config(a.config, a.opts)  # validate before submitting anything
    ipg = a.images_per_gpu or cfg.data.images_per_gpu
    world = a.nodes * tasks
    total = world * ipg * cfg.solver.grad_accum
    scale_to_total_batch(cfg, total)
    overrides = [*a.opts, f"data.images_per_gpu={ipg}"]
    job = TrainJob(str(Path(a.config).resolve()), overrides, total_batch=total,
                   env={"OMP_NUM_THREADS": str(max(1, min(a.cpus_per_task, 8)))})  # fmt: skip
    folder = a.folder.resolve() / "%j"
    command = f"python -m megdet_hpc.train {' '.join(job.argv())}"
    if a.dry_run:
        from submitit.slurm.slurm import _make_sbatch_string

        params = {"nodes": a.nodes, "ntasks_per_node": tasks, "cpus_per_task": a.cpus_per_task,
                  "time": a.timeout, "job_name": a.job_name, "signal_delay_s": a.signal_delay,
                  "setup": a.setup, "additional_parameters": {"requeue": True}}  # fmt: skip
        if a.gpus_per_node:
            params["gpus_per_node"] = a.gpus_per_node
        if a.partition:
            params["partition"] = a.partition
        if a.account:
            params["account"] = a.account
        print(
            _make_sbatch_string(
                command="python -u -m submitit.core._submit <folder>", folder=folder, **params
            )
        )
        print(f"# world size {world} x {ipg} image(s) = total batch {total}; each task runs:\n# {command}")
        return 0
    executor = make_executor(a.folder.resolve(), a.local, nodes=a.nodes, gpus_per_node=a.gpus_per_node,
                             tasks_per_node=tasks, timeout_min=a.timeout, partition=a.partition,
                             account=a.account, cpus_per_task=a.cpus_per_task,
                             signal_delay_s=a.signal_delay, job_name=a.job_name, setup=a.setup)  # fmt: skip
    submitted = executor.submit(job)
    print(
        f"submitted job {submitted.job_id} ({'local' if a.local else 'slurm'}); world {world}, total batch {total}"
    )
    print(f"logs: {submitted.paths.stdout}  {submitted.paths.stderr}")
    print(f"output: {cfg.train.output_dir}")
    if not a.wait:
        return 0
    return _follow(submitted, a.local)


def _job_gone(job, local: bool) -> bool:  # type: ignore[no-untyped-def]
    """True once the job has left the scheduler (sacct may be unavailable: ask squeue)."""
    if local:
        return bool(job.done())
    import subprocess

    out = subprocess.run(["squeue", "-h", "-j", str(job.job_id), "-o", "%T"], capture_output=True, text=True)
    return out.returncode == 0 and not out.stdout.strip()


def _follow(job, local: bool) -> int:  # type: ignore[no-untyped-def]
    """Wait until every task has written its result (a requeued run keeps the job waiting)."""
    tasks = [job.task(i) for i in range(job.num_tasks)] if job.num_tasks > 1 else [job]
    while not all(t.paths.result_pickle.exists() for t in tasks):
        if _job_gone(job, local):
            time.sleep(3)  # results are written just before the job leaves the queue
            if not all(t.paths.result_pickle.exists() for t in tasks):
                print(f"job {job.job_id} ended without a result; see {job.paths.stderr}", file=sys.stderr)
                return 1
        time.sleep(1)
    failed = []
    for t in tasks:
        outcome, value = _load_result(t.paths.result_pickle)
        if outcome != "success" or value != 0:
            failed.append(str(value).strip().splitlines()[-1] if str(value).strip() else outcome)
    if failed:
        print(f"job {job.job_id} failed: {failed[0]}", file=sys.stderr)
        return 1
    print(f"job {job.job_id} finished: {len(tasks)} task(s) succeeded")
    return 0


def _load_result(path: Path) -> tuple[str, object]:
    import pickle

    with open(path, "rb") as fh:
        return pickle.load(fh)


if __name__ == "__main__":
    sys.exit(main())
