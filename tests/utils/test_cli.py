"""The one error path of every entry point: one line and exit 2 for bad input, traceback otherwise."""

from __future__ import annotations

import pytest

from megdet_hpc.utils.cli import ArgumentParser, run_cli
from megdet_hpc.utils.errors import UserError, one_line


def test_argparse_errors_are_one_line_with_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    p = ArgumentParser(prog="megdet_hpc.x")
    p.add_argument("--n", type=int)
    with pytest.raises(SystemExit) as info:
        p.parse(["--n", "many"])
    assert info.value.code == 2
    assert capsys.readouterr().err.splitlines() == [
        "megdet_hpc.x: error: argument --n: invalid int value: 'many'"
    ]


def test_overrides_may_follow_flags() -> None:
    p = ArgumentParser(prog="megdet_hpc.x")
    p.add_argument("--no-resume", action="store_true")
    p.add_argument("opts", nargs="*")
    a = p.parse(["a.b=1", "--no-resume", "solver.max_iter=4"])
    assert a.no_resume and a.opts == ["a.b=1", "solver.max_iter=4"]


def test_user_errors_and_bugs(capsys: pytest.CaptureFixture[str]) -> None:
    def bad_input() -> int:
        raise UserError("train.output_dir /x is not writable")

    def bug() -> int:
        raise KeyError("oops")

    assert run_cli(bad_input, "megdet_hpc.x") == 2
    assert capsys.readouterr().err == "megdet_hpc.x: error: train.output_dir /x is not writable\n"
    assert run_cli(bug, "megdet_hpc.x") == 1
    assert "Traceback" in capsys.readouterr().err


def test_a_loader_worker_error_keeps_only_the_line_that_names_the_file() -> None:
    class DataError(UserError, ValueError):
        pass

    wrapped = DataError(
        "Caught DataError in DataLoader worker process 0.\nOriginal Traceback (most recent call last):\n"
        '  File "x.py", line 1, in f\nmegdet_hpc.data.coco.DataError: cannot read image /d/train_000017.jpg: truncated'
    )
    assert one_line(wrapped) == "cannot read image /d/train_000017.jpg: truncated"
    assert one_line(UserError("first\nsecond")) == "first"
