"""``python -m megdet_hpc.train [--config configs/X.yaml] [section.key=value ...]``

Runs on 1 process, or under ``horovodrun -np N``, ``mpirun -np N``, ``srun`` or ``torchrun``: the
launcher is detected (``megdet_hpc.launch.environment``).  Without ``--config`` the config is chosen as
the sbatch scripts choose theirs, by the total batch of this job (world size x 2 images): the MegDet
256-image config for 128 processes, the 16-image baseline otherwise, its schedule rescaled in images.

Resumes automatically from the newest usable checkpoint in ``train.output_dir``; ``--no-resume``
starts fresh after moving the earlier run into ``archive/<time>/`` (nothing is deleted or
overwritten); ``--resume-from PATH`` picks one.  One training per output directory (an OS lock).
Exit codes: 0 done, 1 bug, 2 bad input, 3 checkpointed after a preemption signal, 4 aborted on
non-finite losses.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from megdet_hpc.utils.cli import EXIT_OK, EXIT_PREEMPTED, ArgumentParser, run_cli

if TYPE_CHECKING:  # torch is imported after the input checks (see main)
    from megdet_hpc.config import Config
    from megdet_hpc.distributed import Comm


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog="megdet_hpc.train", description="Train a MegDet detector")
    p.add_argument("--config", help="YAML config (default: chosen by the job's total batch, see configs/)")
    p.add_argument(
        "--no-resume", action="store_true", help="archive an earlier run in the output dir, start fresh"
    )
    p.add_argument("--resume-from", type=Path, help="resume from this checkpoint file")
    p.add_argument("--total-batch", type=int, help="rescale the schedule (in images) to this total batch")
    p.add_argument("--eval-only", action="store_true", help="evaluate the resumed/loaded model and exit")
    p.add_argument("opts", nargs="*", help="config overrides, section.key=value")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse(argv)

    def _run() -> int:
        # The config and the data files first, torch after: bad input is refused before the ~7 s of
        # CPU that importing torch and torchvision costs every rank.
        from megdet_hpc.config import (
            DEFAULT_IMAGES_PER_GPU,
            BatchPlan,
            ConfigError,
            default_config_for,
            load_config,
            scale_to_total_batch,
        )
        from megdet_hpc.launch.environment import detect

        if args.no_resume and args.resume_from:
            raise ConfigError("--no-resume and --resume-from contradict each other")
        config = args.config
        total = args.total_batch
        if config is None:
            total = total or BatchPlan(detect().size, DEFAULT_IMAGES_PER_GPU).total
            config = str(default_config_for(total))
        cfg = load_config(config, args.opts)
        if total is not None:
            cfg = scale_to_total_batch(cfg, total)
        # The data files too (the same checks as the datasets, which reuse these parses).
        from megdet_hpc.data.annotations import check_dataset_files

        check_dataset_files(cfg.data.train_images, cfg.data.train_annotations, keep=True)
        if cfg.train.eval_at_end or cfg.train.eval_period:
            check_dataset_files(cfg.data.val_images, cfg.data.val_annotations, keep=True)

        from megdet_hpc import distributed

        return distributed.run_with_comm(lambda comm: train_or_evaluate(args, cfg, config, comm))

    return run_cli(_run, "megdet_hpc.train")


def train_or_evaluate(args: argparse.Namespace, cfg: Config, config: str, comm: Comm) -> int:
    """Build the run in ``cfg.train.output_dir`` (resuming as the flags say), train or evaluate it,
    close it; the exit code."""
    from megdet_hpc.checkpoint import CheckpointError
    from megdet_hpc.engine.defaults import build_run, configure_process, select_device
    from megdet_hpc.evaluation import EvaluationInterrupted
    from megdet_hpc.utils.logger import setup_logging

    configure_process(cfg, select_device(cfg, comm.local_rank))

    def start_logging(archived_to: Path | None) -> None:
        setup_logging(comm.rank, Path(cfg.train.output_dir))
        log = logging.getLogger("megdet_hpc")
        if comm.is_main and archived_to is not None:
            log.warning("--no-resume: moved the previous run's files to %s", archived_to)
        if args.config is None and comm.is_main:
            log.info("no --config: using %s at total batch %d", config, cfg.solver.total_batch)

    run = build_run(
        cfg,
        comm,
        fresh=args.no_resume,
        resume=not args.no_resume,
        resume_from=args.resume_from,
        on_opened=start_logging,
    )
    try:
        if not args.eval_only:
            return run.train()
        if run.resumed_from is None and not cfg.model.weights:
            raise CheckpointError(
                f"--eval-only: nothing to evaluate (no checkpoint in {cfg.train.output_dir} and no model.weights)"
            )
        try:
            run.evaluate()
        except EvaluationInterrupted:
            return EXIT_PREEMPTED
        return EXIT_OK
    finally:
        run.close()


if __name__ == "__main__":
    sys.exit(main())
