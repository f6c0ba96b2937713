"""Every MEGDET_* variable the package reads: a bad value is one line naming it, exit 2 (utils.env)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from megdet_hpc import distributed
from megdet_hpc.distributed import comm as comm_module
from megdet_hpc.distributed.torch_comm import torch_backend
from megdet_hpc.launch.local import write_report
from megdet_hpc.utils import env
from megdet_hpc.utils.cli import run_cli

REPO = Path(__file__).resolve().parents[2]

BAD = {
    env.COMM: ("nccl", "MEGDET_COMM='nccl' is not one of auto, horovod, torch, mpi, none"),
    env.CGBN_COMM: ("ncl", "MEGDET_CGBN_COMM='ncl' is not one of main, mpi, nccl, torch-gloo"),
    env.TORCH_BACKEND: ("glue", "MEGDET_TORCH_BACKEND='glue' is not a torch.distributed backend"),
    env.COMM_TIMEOUT_S: ("abc", "MEGDET_COMM_TIMEOUT_S='abc' is not a number of seconds > 0"),
    env.EXIT_DIR: (
        "/nonexistent/megdet",
        "MEGDET_EXIT_DIR='/nonexistent/megdet' is not an existing directory",
    ),
    env.REPORT_DIR: ("/nonexistent/megdet", "MEGDET_REPORT_DIR='/nonexistent/megdet' is not an existing dir"),
}


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in BAD:
        monkeypatch.delenv(name, raising=False)


@pytest.mark.parametrize("name", sorted(BAD))
def test_bad_value_is_one_line_exit_2(name: str, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    value, message = BAD[name]
    monkeypatch.setenv(name, value)
    monkeypatch.setattr(comm_module, "_COMM", None)  # init() checks before it builds anything
    assert run_cli(distributed.init, "prog") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"prog: error: {message}"), err
    assert comm_module._COMM is None


@pytest.mark.parametrize("value", ["-1", "0", "nan", "inf", " "])
def test_timeout_must_be_a_positive_number(value: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(env.COMM_TIMEOUT_S, value)
    if value.strip():
        with pytest.raises(env.EnvError, match="MEGDET_COMM_TIMEOUT_S"):
            env.comm_timeout_s()
    else:
        assert env.comm_timeout_s() == env.DEFAULT_COMM_TIMEOUT_S  # empty = unset


def test_defaults_and_good_values(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    assert (env.comm_backend(), env.cgbn_comm(), env.torch_backend(), env.comm_timeout_s()) == (
        "auto",
        "main",
        None,
        600.0,
    )
    assert env.exit_dir() is None and env.report_dir() is None
    monkeypatch.setenv(env.COMM_TIMEOUT_S, "2.5")
    assert env.comm_timeout_s() == 2.5
    for good in ("gloo", "nccl", "cpu:gloo,cuda:nccl", "mpi"):
        monkeypatch.setenv(env.TORCH_BACKEND, good)
        assert env.torch_backend() == good and torch_backend("cuda") == good
    for bad in ("cpu:gloo,cuda:", "tpu:gloo", "gloo,"):
        monkeypatch.setenv(env.TORCH_BACKEND, bad)
        with pytest.raises(env.EnvError, match="MEGDET_TORCH_BACKEND"):
            env.torch_backend()
    monkeypatch.setenv(env.REPORT_DIR, str(tmp_path))
    assert write_report(3, {"x": 1}) == tmp_path / "rank3.json"
    monkeypatch.delenv(env.TORCH_BACKEND)
    env.check_all()


def test_a_bad_value_stops_training_in_one_line(tiny_config, tmp_path: Path) -> None:
    """The real entry point: no traceback, exit 2, before any rendezvous (config and data are valid:
    they are checked first)."""
    proc = subprocess.run(
        [sys.executable, "-m", "megdet_hpc.train", "--config", str(tiny_config())],
        cwd=tmp_path,
        env={**_base_env(), env.COMM_TIMEOUT_S: "-1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert lines[-1] == "megdet_hpc.train: error: MEGDET_COMM_TIMEOUT_S='-1' is not a number of seconds > 0"
    assert "Traceback" not in proc.stderr


def _base_env() -> dict[str, str]:
    import os

    keep = {k: v for k, v in os.environ.items() if not k.startswith("MEGDET_")}
    return {**keep, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
