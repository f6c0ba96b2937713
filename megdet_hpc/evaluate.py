"""``python -m megdet_hpc.evaluate --config C [--checkpoint PATH] [--out DIR] [overrides]``

COCO bbox evaluation of a checkpoint (default: the newest usable one in ``train.output_dir``) on the
config's val split, distributed over however many processes the launcher started.  It only *reads*
the run directory -- no lock, no clean-up of temporary files, nothing written among the run's own
files -- so it is safe on a run that is still training.  Results go to ``--out`` (default
``<output_dir>/evaluate/<checkpoint>/``): ``bbox_results.json``, ``metrics.json`` (with per-class AP),
``summary.txt`` and ``pr_curves.png``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from megdet_hpc.utils.cli import ArgumentParser, run_cli

if TYPE_CHECKING:  # torch is imported after the input checks (see main)
    from torch.utils.data import Dataset

    from megdet_hpc.config import Config
    from megdet_hpc.distributed import Comm


def main(argv: list[str] | None = None) -> int:
    p = ArgumentParser(prog="megdet_hpc.evaluate", description="Evaluate a MegDet checkpoint")
    p.add_argument("--config", required=True)
    p.add_argument("--checkpoint", type=Path, help="checkpoint file (default: newest usable in output_dir)")
    p.add_argument("--out", type=Path, help="result folder (default: <output_dir>/evaluate/<checkpoint>)")
    p.add_argument("opts", nargs="*")
    a = p.parse(argv)

    def _run() -> int:
        from megdet_hpc.config import load_config

        cfg = load_config(a.config, a.opts)  # a bad config is refused before torch is imported
        from megdet_hpc.data.annotations import check_dataset_files

        check_dataset_files(
            cfg.data.val_images, cfg.data.val_annotations, keep=True
        )  # so are broken data files

        from megdet_hpc import distributed
        from megdet_hpc.data.loader import build_val_dataset
        from megdet_hpc.engine.defaults import device_type

        dataset = build_val_dataset(cfg)
        return distributed.run_with_comm(
            lambda comm: evaluate_checkpoint(a, cfg, dataset, comm), device=device_type(cfg)
        )

    return run_cli(_run, "megdet_hpc.evaluate")


def evaluate_checkpoint(args: argparse.Namespace, cfg: Config, dataset: Dataset, comm: Comm) -> int:
    """Load the checkpoint ``args`` name, evaluate it on ``dataset``, print its scalars (rank 0)."""
    from megdet_hpc.engine.defaults import select_device
    from megdet_hpc.evaluation import evaluate
    from megdet_hpc.modeling.fit import model_from_checkpoint
    from megdet_hpc.utils.logger import setup_logging

    setup_logging(comm.rank)
    model, path = model_from_checkpoint(cfg, comm, args.checkpoint, hint="evaluate it with its own config")
    device = select_device(cfg, comm.local_rank)
    model.to(device)
    out = args.out or Path(cfg.train.output_dir) / "evaluate" / path.stem
    metrics = evaluate(model, dataset, comm, device, out, cfg.eval.max_images, plots=cfg.train.plots)
    if comm.is_main:
        scalars = {k: v for k, v in metrics.items() if isinstance(v, float)}
        print(json.dumps({"checkpoint": str(path), "out": str(out), **scalars}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
