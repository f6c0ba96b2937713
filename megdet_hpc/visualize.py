"""``python -m megdet_hpc.visualize --config C [--checkpoint PATH] [--out grid.png] [--num 8]``

Draws predicted boxes (class and score) beside the ground truth on validation images into a PNG grid
(``megdet_hpc.evaluation.visualize``).  One process; reads the run directory only.
"""

from __future__ import annotations

import sys
from pathlib import Path

from megdet_hpc.utils.cli import ArgumentParser, run_cli


def main(argv: list[str] | None = None) -> int:
    p = ArgumentParser(prog="megdet_hpc.visualize", description="Draw predictions beside ground truth")
    p.add_argument("--config", required=True)
    p.add_argument("--checkpoint", type=Path, help="checkpoint file (default: newest usable in output_dir)")
    p.add_argument("--out", type=Path, default=Path("predictions.png"))
    p.add_argument("--num", type=int, default=8, help="validation images to draw")
    p.add_argument("--score", type=float, default=0.5, help="minimum score of a drawn prediction")
    p.add_argument("opts", nargs="*")
    a = p.parse(argv)

    def _run() -> int:
        from megdet_hpc.checkpoint import Checkpointer, CheckpointError
        from megdet_hpc.config import ConfigError, load_config
        from megdet_hpc.data.loader import build_val_dataset
        from megdet_hpc.distributed.single import SingleProcessComm
        from megdet_hpc.engine.trainer import select_device
        from megdet_hpc.evaluation.visualize import draw_predictions
        from megdet_hpc.modeling import build_model

        if a.num < 1 or not 0 <= a.score <= 1:
            raise ConfigError("--num must be >= 1 and --score in [0, 1]")
        cfg = load_config(a.config, a.opts)
        dataset = build_val_dataset(cfg)
        comm = SingleProcessComm()
        path = Checkpointer(Path(cfg.train.output_dir), comm).find_valid(a.checkpoint)
        if path is None:
            raise CheckpointError(f"no usable checkpoint in {cfg.train.output_dir}")
        model = build_model(cfg)
        model.load_state_dict(Checkpointer(path.parent, comm).load(path)["model"])
        device = select_device(cfg, 0)
        model.to(device)
        out = draw_predictions(model, dataset, device, a.num, a.out, score_threshold=a.score)
        print(f"drew {min(a.num, len(dataset))} validation images ({path.name}) into {out}")
        return 0

    return run_cli(_run, "megdet_hpc.visualize")


if __name__ == "__main__":
    sys.exit(main())
