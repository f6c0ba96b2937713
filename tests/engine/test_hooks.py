"""The training loop and its policies, in process (detectron2 tests its hooks the same way).

A small ``TrainerBase`` stands in for the real trainer: its ``run_step`` returns scripted results and
its ``save_checkpoint``/``run_eval``/``preempt`` record calls, so each hook's decisions are checked
without a model or a collective.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path
from types import SimpleNamespace

import pytest

from megdet_hpc.distributed.single import SingleProcessComm
from megdet_hpc.engine.hooks import (
    EvalHook,
    MetricsHook,
    NonFiniteGuard,
    PeriodicCheckpointer,
    PreemptionHook,
)
from megdet_hpc.engine.metrics import MetricsWriter
from megdet_hpc.engine.signals import StopFlag
from megdet_hpc.engine.train_loop import HookBase, StepResult, StopTraining, TrainerBase
from megdet_hpc.utils.cli import EXIT_NONFINITE, EXIT_OK, EXIT_PREEMPTED


class ScriptedTrainer(TrainerBase):
    def __init__(
        self, tmp_path: Path, max_iter: int = 6, skipped: tuple[int, ...] = (), evals: list | None = None
    ):
        super().__init__()
        self.max_iter = max_iter
        self.progress = SimpleNamespace(iteration=0, images_seen=0, nonfinite_streak=0)
        self.comm = SingleProcessComm()
        self.batch = SimpleNamespace(total=4)
        self.output_dir = tmp_path
        self.metrics = MetricsWriter(tmp_path, True, tensorboard=False)
        self.stop_flag = StopFlag()
        self.checkpointer = SimpleNamespace(
            raise_if_failed=lambda: None, last_saved_iteration=None, wait=lambda: None
        )
        self.skipped = skipped
        self.evals = list(evals or [])
        self.calls: list[tuple] = []

    @property
    def iteration(self) -> int:  # type: ignore[override]
        return self.progress.iteration

    def run_step(self) -> StepResult:
        p = self.progress
        p.iteration += 1
        p.images_seen += 4
        flags = self.vote_flags()  # one rank: the "agreed" flags are this rank's
        return StepResult(
            p.iteration,
            p.images_seen,
            0.01,
            {"loss_a": 1.0, "loss_b": 0.5},
            p.iteration in self.skipped,
            flags,
        )

    def save_checkpoint(self, block: bool = False) -> None:
        self.calls.append(("save", self.iteration, block))
        self.checkpointer.last_saved_iteration = self.iteration

    def run_eval(self):  # type: ignore[no-untyped-def]
        self.calls.append(("eval", self.iteration))
        return self.evals.pop(0) if self.evals else {"AP": 0.5}

    def preempt(self) -> None:
        self.calls.append(("preempt", self.iteration))
        raise StopTraining(EXIT_PREEMPTED)

    def draw_predictions(self, count: int) -> None:
        self.calls.append(("draw", count))


class Recorder(HookBase):
    def __init__(self, events: list[str]) -> None:
        self.events = events

    def before_train(self) -> None:
        self.events.append("before")

    def after_step(self, result: StepResult) -> None:
        self.events.append(f"step{result.iteration}")

    def after_train(self) -> None:
        self.events.append("after")

    def close(self) -> None:
        self.events.append("close")


def test_loop_runs_hooks_in_order_and_after_train_only_on_completion(tmp_path: Path) -> None:
    events: list[str] = []
    t = ScriptedTrainer(tmp_path, max_iter=3)
    t.register_hooks([Recorder(events)])
    assert t.train() == EXIT_OK and t.completed
    assert events == ["before", "step1", "step2", "step3", "after", "close"]
    events.clear()
    t = ScriptedTrainer(tmp_path, max_iter=5, skipped=(2, 3))
    t.register_hooks([NonFiniteGuard(2), Recorder(events)])
    assert t.train() == EXIT_NONFINITE and not t.completed
    assert events == [
        "before",
        "step1",
        "step2",
        "close",
    ]  # the guard stopped at step 3, before the recorder saw it


def test_non_finite_streak_resets_on_a_good_step(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    t = ScriptedTrainer(tmp_path, max_iter=6, skipped=(2, 3, 5))
    t.register_hooks([NonFiniteGuard(3)])
    with caplog.at_level("ERROR"):
        assert t.train() == EXIT_OK
    assert "non-finite loss or gradient at iteration 3 on at least one rank (2 in a row)" in caplog.text
    assert t.progress.nonfinite_streak == 0


def test_two_hooks_cannot_vote_on_one_flag(tmp_path: Path) -> None:
    class Voter(HookBase):
        def vote_flags(self) -> dict[str, bool]:
            return {"stop": False}

    t = ScriptedTrainer(tmp_path)
    t.register_hooks([Voter(), Voter()])
    with pytest.raises(RuntimeError, match="two hooks vote on the flag 'stop'"):
        t.vote_flags()


def test_periodic_and_time_based_checkpoints_and_the_final_save(tmp_path: Path) -> None:
    t = ScriptedTrainer(tmp_path, max_iter=5)
    t.register_hooks([PeriodicCheckpointer(period=2, minutes=0)])
    t.train()
    assert t.calls == [("save", 2, False), ("save", 4, False), ("save", 5, True)]
    t = ScriptedTrainer(tmp_path, max_iter=3)
    t.register_hooks([PeriodicCheckpointer(period=0, minutes=1e-9)])  # rank 0's clock is always due
    t.train()
    assert [c[1] for c in t.calls] == [1, 2, 3]  # the last iteration is saved already: no second save


def test_a_signal_stops_after_the_step_with_a_checkpoint(tmp_path: Path) -> None:
    class SignalAt(HookBase):
        def after_step(self, result: StepResult) -> None:
            if result.iteration == 2:
                os.kill(os.getpid(), signal.SIGUSR1)

    t = ScriptedTrainer(tmp_path, max_iter=10)
    t.register_hooks([SignalAt(), PreemptionHook(["SIGUSR1"]), PeriodicCheckpointer(0, 0)])
    assert t.train() == EXIT_PREEMPTED
    assert t.calls == [("preempt", 3)] and t.stop_flag.signal_name == "SIGUSR1"
    assert signal.getsignal(signal.SIGUSR1) is signal.SIG_DFL  # handler removed on the way out


def test_evaluation_periodic_final_and_interrupted(tmp_path: Path) -> None:
    t = ScriptedTrainer(tmp_path, max_iter=4)
    t.register_hooks([EvalHook(period=2, at_end=True, vis_images=3)])
    t.train()
    assert t.calls == [("eval", 2), ("eval", 4), ("draw", 3)]  # not twice at the last iteration
    t = ScriptedTrainer(tmp_path, max_iter=4, evals=[None])  # a signal interrupted the evaluation
    t.register_hooks([EvalHook(period=2, at_end=True, vis_images=0)])
    assert t.train() == EXIT_PREEMPTED and t.calls == [("eval", 2), ("preempt", 2)]


def test_metrics_every_period_and_curves_when_done(tmp_path: Path) -> None:
    t = ScriptedTrainer(tmp_path, max_iter=5)
    t.register_hooks([MetricsHook(period=2)])
    t.train()
    rows = t.metrics.records
    assert [r["iteration"] for r in rows] == [2, 4, 5]  # every period and the last iteration
    assert rows[0]["loss"] == 1.5 and rows[0]["loss/loss_b"] == 0.5 and rows[0]["images_per_s"] > 0
    assert (tmp_path / "metrics.jsonl").read_text().count("\n") == 3
    assert (tmp_path / "training_curves.png").read_bytes()[:4] == b"\x89PNG"
