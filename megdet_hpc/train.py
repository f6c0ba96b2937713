"""``python -m megdet_hpc.train --config configs/X.yaml [section.key=value ...]``

Runs on 1 process, or under ``horovodrun -np N``, ``mpirun -np N``, ``srun`` or ``torchrun``: the
launcher is detected (``megdet_hpc.distributed.env``).  Resumes automatically from the newest valid checkpoint
in ``train.output_dir`` (``--no-resume`` starts fresh without deleting anything, ``--resume-from PATH``
picks one).  Exit codes: 0 done, 2 bad input, 3 checkpointed after a preemption signal, 4 aborted on
non-finite losses.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from megdet_hpc.cli import run_cli


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="megdet_hpc.train", description="Train a MegDet detector")
    p.add_argument("--config", required=True, help="YAML config (see configs/)")
    p.add_argument("--no-resume", action="store_true", help="start fresh even if checkpoints exist")
    p.add_argument("--resume-from", type=Path, help="resume from this checkpoint file")
    p.add_argument("--total-batch", type=int, help="rescale the schedule (in images) to this total batch")
    p.add_argument("--eval-only", action="store_true", help="evaluate the resumed/loaded model and exit")
    p.add_argument("opts", nargs="*", help="config overrides, section.key=value")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def _run() -> int:
        from megdet_hpc import distributed
        from megdet_hpc.config import ConfigError, load_config, scale_to_total_batch
        from megdet_hpc.engine import Trainer
        from megdet_hpc.utils_logging import setup_logging

        cfg = load_config(args.config, args.opts)
        if args.total_batch:
            scale_to_total_batch(cfg, args.total_batch)
        if args.no_resume and args.resume_from:
            raise ConfigError("--no-resume and --resume-from contradict each other")
        comm = distributed.init()
        setup_logging(comm.rank, Path(cfg.train.output_dir))
        try:
            trainer = Trainer(cfg, resume=not args.no_resume, resume_from=args.resume_from)
            if args.eval_only:
                trainer.run_eval()
                return 0
            return trainer.train()
        finally:
            distributed.shutdown()

    return run_cli(_run, "megdet_hpc.train")


if __name__ == "__main__":
    sys.exit(main())
