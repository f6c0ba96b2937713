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
        from megdet_hpc.config import ConfigError, load_config
        from megdet_hpc.data.loader import build_val_dataset
        from megdet_hpc.distributed.single import SingleProcessComm
        from megdet_hpc.engine.defaults import select_device
        from megdet_hpc.evaluation.visualize import draw_predictions
        from megdet_hpc.modeling.fit import model_from_checkpoint

        if a.num < 1 or not 0 <= a.score <= 1:
            raise ConfigError("--num must be >= 1 and --score in [0, 1]")
        cfg = load_config(a.config, a.opts)
        dataset = build_val_dataset(cfg)
        model, path = model_from_checkpoint(
            cfg, SingleProcessComm(), a.checkpoint, hint="draw it with its own config"
        )
        device = select_device(cfg, 0)
        model.to(device)
        out = draw_predictions(model, dataset, device, a.num, a.out, score_threshold=a.score)
        print(f"drew {min(a.num, len(dataset))} validation images ({path.name}) into {out}")
        return 0

    return run_cli(_run, "megdet_hpc.visualize")


if __name__ == "__main__":
    sys.exit(main())
