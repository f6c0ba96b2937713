"""``python -m megdet_hpc.evaluate --config C [--checkpoint PATH] [--out DIR] [overrides]``

COCO bbox evaluation of a checkpoint (default: the newest usable one in ``train.output_dir``) on the
config's val split, distributed over however many processes the launcher started.  It only *reads*
the run directory -- no lock, no clean-up of temporary files, nothing written among the run's own
files -- so it is safe on a run that is still training.  Results go to ``--out`` (default
``<output_dir>/evaluate/<checkpoint>/``): ``bbox_results.json``, ``metrics.json`` (with per-class AP),
``summary.txt`` and ``pr_curves.png``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from megdet_hpc.utils.cli import ArgumentParser, run_cli


def main(argv: list[str] | None = None) -> int:
    p = ArgumentParser(prog="megdet_hpc.evaluate", description="Evaluate a MegDet checkpoint")
    p.add_argument("--config", required=True)
    p.add_argument("--checkpoint", type=Path, help="checkpoint file (default: newest usable in output_dir)")
    p.add_argument("--out", type=Path, help="result folder (default: <output_dir>/evaluate/<checkpoint>)")
    p.add_argument("opts", nargs="*")
    a = p.parse(argv)

    def _run() -> int:
        from megdet_hpc import distributed
        from megdet_hpc.checkpoint import Checkpointer, CheckpointError
        from megdet_hpc.config import architecture_differences, load_config
        from megdet_hpc.data.loader import build_val_dataset
        from megdet_hpc.engine.trainer import device_type, select_device
        from megdet_hpc.evaluation import evaluate
        from megdet_hpc.modeling import build_model
        from megdet_hpc.modeling.fit import load_weights
        from megdet_hpc.utils.logger import setup_logging

        cfg = load_config(a.config, a.opts)
        dataset = build_val_dataset(cfg)
        comm = distributed.init(device=device_type(cfg))
        setup_logging(comm.rank)
        try:
            path = Checkpointer(Path(cfg.train.output_dir), comm, background=False).find_valid(a.checkpoint)
            if path is None:
                raise CheckpointError(f"no usable checkpoint in {cfg.train.output_dir}")
            state = Checkpointer(path.parent, comm).load(path)
            differences = architecture_differences(state.get("config", {}), cfg)
            if differences:
                raise CheckpointError(
                    f"{path.name} was trained with another model ({'; '.join(differences)}); "
                    "evaluate it with its own config"
                )
            model = build_model(cfg)
            load_weights(model, state["model"], path.name)
            device = select_device(cfg, comm.local_rank)
            model.to(device)
            out = a.out or Path(cfg.train.output_dir) / "evaluate" / path.stem
            metrics = evaluate(model, dataset, comm, device, out, cfg.eval.max_images)
            if comm.is_main and metrics is not None:
                scalars = {k: v for k, v in metrics.items() if isinstance(v, float)}
                print(json.dumps({"checkpoint": str(path), "out": str(out), **scalars}))
            return 0
        finally:
            distributed.shutdown()

    return run_cli(_run, "megdet_hpc.evaluate")


if __name__ == "__main__":
    sys.exit(main())
