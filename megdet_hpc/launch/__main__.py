"""``python -m megdet_hpc.launch [submitit|sbatch|local] ...``: every way to start a training.

* ``submitit`` (the default, so ``python -m megdet_hpc.launch --nodes 16`` works as written): submit
  through submitit's Slurm executor (``--local``: its local executor), print the job id and logs,
  ``--wait`` to follow it, ``--dry-run`` to print the sbatch script and the training command.
* ``sbatch``: render an sbatch script from the one template (``--gpus 128 --gpus-per-node 8 ...``).
* ``local``: run ``python -m megdet_hpc.train`` here under ``horovodrun``/``mpirun``/torchrun
  (``--launcher``, a launch method of ``launch.names``).

``submitit`` and ``sbatch`` take the same resource flags (``launch.resources``: ``--nodes``/``--gpus``,
``--time``, ``--signal-lead``, ...), validated by the same rules.

Without ``--config`` the config is chosen like the committed sbatch scripts choose theirs: by the
total batch (GPUs x images per GPU; 256 -> ``megdet_r50_fpn_bs256.yaml``, else the bs16 baseline with
its schedule rescaled in images).
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

from megdet_hpc.launch import names, resources
from megdet_hpc.utils.cli import ArgumentParser, run_cli
from megdet_hpc.utils.errors import UserError

COMMANDS = ("submitit", "sbatch", "local")


class LaunchError(UserError, ValueError):
    """Bad launcher parameters or a refused submission, with a one-line message."""


def submitit_parser() -> ArgumentParser:
    p = ArgumentParser(prog="megdet_hpc.launch", description="Submit MegDet training via submitit")
    resources.add_arguments(p)
    p.add_argument("--config", help="default: chosen by total batch like slurm/*.sh")
    p.add_argument("--images-per-gpu", type=int, help="default: the config's data.images_per_gpu")
    p.add_argument("--folder", type=Path, default=Path("logs/submitit"), help="submitit job folder")
    p.add_argument("--local", action="store_true", help="submitit's local executor (no Slurm)")
    p.add_argument("--dry-run", action="store_true", help="print the sbatch script; submit nothing")
    p.add_argument("--wait", action="store_true", help="follow the job; exit with its status")
    p.add_argument("opts", nargs="*", help="config overrides section.key=value")
    return p


def _submitit(a) -> int:  # type: ignore[no-untyped-def]
    from megdet_hpc.config import (
        DEFAULT_IMAGES_PER_GPU,
        BatchPlan,
        default_config_for,
        load_config,
        scale_to_total_batch,
    )

    res = resources.from_arguments(a)
    resources.check_images_per_gpu(a.images_per_gpu)
    world = res.tasks
    if a.config:
        config = a.config
    else:
        config = str(default_config_for(BatchPlan(world, a.images_per_gpu or DEFAULT_IMAGES_PER_GPU).total))
    cfg = load_config(config, a.opts)  # validate before submitting anything
    ipg = a.images_per_gpu or cfg.data.images_per_gpu
    total = world * ipg * cfg.solver.grad_accum
    cfg = scale_to_total_batch(cfg, total)  # the schedule the job will run (and a bad total fails here)
    from megdet_hpc.launch.submitit_launcher import TrainJob, follow, make_executor, sbatch_preview

    overrides = [*a.opts, f"data.images_per_gpu={ipg}"]
    job = TrainJob(
        str(Path(config).resolve()),
        overrides,
        total_batch=total,
        env={"OMP_NUM_THREADS": str(max(1, min(res.cpus_per_task, 8)))},
    )
    command = f"python -m megdet_hpc.train {' '.join(job.argv())}"
    summary = f"world size {world} x {ipg} image(s) = total batch {total}; config {config}"
    if a.dry_run:
        print(sbatch_preview(a.folder.resolve() / "%j", res))
        print(f"# {summary}\n# each task runs:\n# {command}")
        return 0
    executor = make_executor(a.folder.resolve(), a.local, res)
    try:
        with _stderr_captured() as said:  # sbatch writes its refusal to our stderr too
            submitted = executor.submit(job)
    except Exception as exc:  # submitit's FailedJobError carries sbatch's complaint
        if type(exc).__name__ != "FailedJobError":
            raise
        lines = [line.strip() for line in (said.text + str(exc)).splitlines() if "error" in line.lower()]
        raise LaunchError(f"sbatch refused the job: {(lines or [str(exc)])[0]}") from exc
    print(f"submitted job {submitted.job_id} ({'local' if a.local else 'slurm'}); {summary}")
    print(f"logs: {submitted.paths.stdout}  {submitted.paths.stderr}")
    print(f"output: {cfg.train.output_dir}")
    return follow(submitted, a.local) if a.wait else 0


class _Captured:
    text = ""


@contextlib.contextmanager
def _stderr_captured() -> Iterator[_Captured]:
    """File descriptor 2 (child processes write there directly) into ``.text`` while the block runs."""
    sys.stderr.flush()
    captured = _Captured()
    saved = os.dup(2)
    with tempfile.TemporaryFile("w+") as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield captured
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            sink.seek(0)
            captured.text = sink.read()


def local_parser() -> ArgumentParser:
    p = ArgumentParser(prog="megdet_hpc.launch local", description="Train here under a real launcher")
    p.add_argument("--launcher", choices=names.LAUNCH_METHODS, default=names.HVD_MPI, help="launch method")
    p.add_argument("-np", "--nproc", type=int, default=2, help="processes")
    p.add_argument("--config", help="default: chosen by total batch")
    p.add_argument("train_args", nargs="*", help="overrides and flags for megdet_hpc.train")
    return p


def _local(a) -> int:  # type: ignore[no-untyped-def]
    """The job's exit code: the ranks' (0, 2, 3, 4, 5), not the launcher's, and a stop signal to
    this process becomes a checkpoint (``launch.relay``)."""
    from megdet_hpc.launch import relay
    from megdet_hpc.launch.local import local_command, local_env

    if a.nproc < 1:
        raise LaunchError(f"-np must be >= 1, got {a.nproc}")
    argv = ["-m", "megdet_hpc.train", *(["--config", a.config] if a.config else []), *a.train_args]
    command = local_command(a.launcher, a.nproc, argv)
    return relay.run(command, local_env(a.launcher), a.nproc, marker="megdet_hpc.train")


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    command = args.pop(0) if args and args[0] in COMMANDS else "submitit"
    if command == "sbatch":
        from megdet_hpc.launch.sbatch import main as sbatch_main

        return sbatch_main(args)
    if command == "local":
        ns = local_parser().parse_known_args(args)
        parsed, extra = ns
        parsed.train_args = [*parsed.train_args, *extra]
        return run_cli(lambda: _local(parsed), "megdet_hpc.launch local")
    parsed = submitit_parser().parse(args)
    return run_cli(lambda: _submitit(parsed), "megdet_hpc.launch")


if __name__ == "__main__":
    sys.exit(main())
