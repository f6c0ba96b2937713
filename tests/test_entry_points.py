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


@pytest.mark.parametrize("module", ["train", "evaluate"])
def test_bad_input_is_refused_before_torch_is_imported(module: str, tiny_config, tmp_path: Path) -> None:
    """Every rank pays ~7 s of CPU to import torch and torchvision: a config or data error must not."""
    import subprocess
    import sys

    probe = (
        "import sys\n"
        f"from megdet_hpc.{module} import main\n"
        "code = main(sys.argv[1:])\n"
        "print(code, 'torch' in sys.modules)\n"
    )
    argv = ["--config", str(tiny_config()), "train.log_period=0"]
    proc = subprocess.run([sys.executable, "-c", probe, *argv], capture_output=True, text=True, timeout=60)
    assert proc.stdout.split() == ["2", "False"], proc.stdout + proc.stderr
    assert "train.log_period must be > 0" in proc.stderr
    # and so is a broken annotation file (the file the module reads: train, val)
    annotations = tmp_path / "broken.json"
    annotations.write_text('{"images": [], "categories": []}')
    argv = [
        "--config",
        str(tiny_config()),
        f"data.{'train' if module == 'train' else 'val'}_annotations={annotations}",
    ]
    proc = subprocess.run([sys.executable, "-c", probe, *argv], capture_output=True, text=True, timeout=60)
    assert proc.stdout.split() == ["2", "False"], proc.stdout + proc.stderr
    assert f"{annotations}: no 'annotations' list" in proc.stderr
