"""``python -m megdet_hpc.evaluate --config C [--checkpoint PATH] [overrides]``

COCO bbox evaluation of a checkpoint (default: the newest valid one in ``train.output_dir``) on the
config's val split, distributed over however many processes the launcher started.  Writes
``bbox_results.json`` and ``metrics.json`` to ``--out`` (default ``<output_dir>/eval``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from megdet_hpc.cli import run_cli


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="megdet_hpc.evaluate", description="Evaluate a MegDet checkpoint")
    p.add_argument("--config", required=True)
    p.add_argument("--checkpoint", type=Path, help="checkpoint file (default: newest valid in output_dir)")
    p.add_argument("--out", type=Path)
    p.add_argument("opts", nargs="*")
    a = p.parse_args(argv)

    def _run() -> int:
        from megdet_hpc import distributed
        from megdet_hpc.checkpoint import Checkpointer, CheckpointError
        from megdet_hpc.config import load_config
        from megdet_hpc.data.loader import build_val_dataset
        from megdet_hpc.engine.trainer import select_device
        from megdet_hpc.evaluation import evaluate
        from megdet_hpc.modeling import build_model
        from megdet_hpc.utils_logging import setup_logging

        cfg = load_config(a.config, a.opts)
        comm = distributed.init()
        setup_logging(comm.rank)
        try:
            ckpt = Checkpointer(Path(cfg.train.output_dir), comm, background=False)
            path = ckpt.find_valid(a.checkpoint)
            if path is None:
                raise CheckpointError(f"no valid checkpoint in {cfg.train.output_dir}")
            state = ckpt.load(path)
            model = build_model(cfg)
            model.load_state_dict(state["model"])
            device = select_device(cfg, comm.local_rank)
            model.to(device)
            out = a.out or Path(cfg.train.output_dir) / "eval"
            metrics = evaluate(model, build_val_dataset(cfg), comm, device, out, cfg.eval.max_images)
            if comm.is_main:
                print(json.dumps({"checkpoint": str(path), **metrics}))
            return 0
        finally:
            distributed.shutdown()

    return run_cli(_run, "megdet_hpc.evaluate")


if __name__ == "__main__":
    sys.exit(main())
