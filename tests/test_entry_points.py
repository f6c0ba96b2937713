"""Every ``python -m megdet_hpc.X`` entry point answers bad input with one line naming the problem on
stderr and exit code 2 -- never a traceback (in process: the same ``main`` the module runs)."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest
import torch

MISSING = "/nonexistent/megdet.yaml"

CASES = {
    "train": (["--config", MISSING], MISSING),
    "evaluate": (["--config", MISSING], MISSING),
    "visualize": (["--config", MISSING], MISSING),
    "plan": (["--config", MISSING, "--gpus", "8"], MISSING),
    "launch.__main__": (["submitit", "--definitely-not-a-flag"], "--definitely-not-a-flag"),
    "launch.sbatch": (["--definitely-not-a-flag"], "--definitely-not-a-flag"),
    "engine.report": (["/nonexistent/run"], "no metrics.jsonl in /nonexistent/run"),
    "solver.schedule": (["--config", MISSING], MISSING),
    "data.synthetic": (["--out", "/tmp/x", "--train", "many"], "invalid int value: 'many'"),
    "perf.calibrate": (["--step"], "--config"),
    "experiments.megdet_table": (["--images", "many"], "invalid int value: 'many'"),
    "experiments.parity": (["--epochs", "many"], "invalid int value: 'many'"),
}


def run_main(module: str, argv: list[str]) -> int:
    main = importlib.import_module(f"megdet_hpc.{module}").main
    try:
        return main(argv)
    except SystemExit as stop:  # argparse exits
        return int(stop.code)


@pytest.mark.parametrize("module", sorted(CASES))
def test_bad_input_is_one_line_and_exit_2(module: str, capsys: pytest.CaptureFixture[str]) -> None:
    argv, named = CASES[module]
    assert run_main(module, argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "error" in err[0] and named in err[0], err


def test_visualize_a_checkpoint_of_another_model_is_one_line(
    tiny_config, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bare = tmp_path / "bare.pth"
    torch.save({"model": {"backbone.body.conv1.weight": torch.zeros(1)}}, bare)
    assert run_main("visualize", ["--config", str(tiny_config()), "--checkpoint", str(bare)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("megdet_hpc.visualize: error: bare.pth: weights do not fit"), (
        err
    )
