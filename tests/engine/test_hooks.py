"""The training loop and its policies, in process (detectron2 tests its hooks the same way).

Each hook is built from the real objects it is given -- a ``Checkpointer`` on a temporary folder, a
``MetricsWriter``, a ``StopFlag``, plain functions for the state, the evaluation and the requeue --
and driven by ``ScriptedLoop``, a ``TrainerBase`` whose steps return scripted results: no model, no
collective, and nothing of a trainer to imitate.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

import pytest

from megdet_hpc.checkpoint import Checkpointer, candidates, load_file
from megdet_hpc.distributed.single import SingleProcessComm
from megdet_hpc.engine.hooks import (
    EvalHook,
    MetricsHook,
    NonFiniteGuard,
    PeriodicCheckpointer,
    PreemptionHook,
    StallWatchdogHook,
)
from megdet_hpc.engine.metrics import MetricsWriter
from megdet_hpc.engine.signals import StopFlag
from megdet_hpc.engine.train_loop import HookBase, StepResult, StopTraining, TrainerBase
from megdet_hpc.engine.watchdog import StallWatchdog
from megdet_hpc.evaluation import EvaluationInterrupted
from megdet_hpc.utils.cli import EXIT_NONFINITE, EXIT_OK, EXIT_PREEMPTED


class ScriptedLoop(TrainerBase):
    """A loop of ``max_iter`` steps of 4 images; the iterations in ``skipped`` are non-finite."""

    def __init__(self, max_iter: int = 6, skipped: tuple[int, ...] = ()) -> None:
        super().__init__()
        self.max_iter = max_iter
        self.iteration = 0
        self.skipped = skipped

    def run_step(self) -> StepResult:
        self.iteration += 1
        flags = self.vote_flags()  # one rank: the "agreed" flags are this rank's
        losses = {"loss_a": 1.0, "loss_b": 0.5}
        return StepResult(
            self.iteration, 4 * self.iteration, 0.01, losses, self.iteration in self.skipped, flags
        )


def saver(tmp_path: Path) -> tuple[Checkpointer, Any]:
    """A real checkpointer on ``tmp_path`` and a state function that records the iteration."""
    checkpointer = Checkpointer(tmp_path, SingleProcessComm(), keep=10, background=False)
    checkpointer.open()
    states: list[int] = []

    def state() -> tuple[dict[str, Any], dict[str, Any]]:
        states.append(len(states))
        return {"model": {}, "call": len(states)}, {"iteration": len(states)}

    return checkpointer, state


def saved_iterations(folder: Path) -> list[int]:
    return sorted(int(p.stem.split("_")[1]) for p in candidates(folder))


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


def test_loop_runs_hooks_in_order_and_after_train_only_on_completion() -> None:
    events: list[str] = []
    t = ScriptedLoop(max_iter=3)
    t.register_hooks([Recorder(events)])
    assert t.train() == EXIT_OK and t.completed
    assert events == ["before", "step1", "step2", "step3", "after", "close"]
    events.clear()
    t = ScriptedLoop(max_iter=5, skipped=(2, 3))
    t.register_hooks([NonFiniteGuard(2), Recorder(events)])
    assert t.train() == EXIT_NONFINITE and not t.completed
    assert events == ["before", "step1", "step2", "close"]  # the guard stopped at step 3, before the recorder


def test_non_finite_streak_resets_on_a_good_step_and_is_the_hooks_state(
    caplog: pytest.LogCaptureFixture,
) -> None:
    guard = NonFiniteGuard(3)
    t = ScriptedLoop(max_iter=6, skipped=(2, 3, 5))
    t.register_hooks([guard])
    with caplog.at_level("ERROR"):
        assert t.train() == EXIT_OK
    assert "non-finite loss or gradient at iteration 3 on at least one rank (2 in a row)" in caplog.text
    assert guard.state_dict() == {"streak": 0}
    # The streak survives a resume: the checkpoint carries it under the hook's name.
    resumed = NonFiniteGuard(3)
    t = ScriptedLoop(max_iter=2, skipped=(1, 2))
    t.register_hooks([resumed])
    t.load_hooks_state_dict({"NonFiniteGuard": {"streak": 1}})
    assert t.train() == EXIT_NONFINITE  # 1 carried + 2 new = 3 in a row
    assert t.hooks_state_dict() == {"NonFiniteGuard": {"streak": 3}}


def test_two_hooks_cannot_vote_on_one_flag() -> None:
    class Voter(HookBase):
        def vote_flags(self) -> dict[str, bool]:
            return {"stop": False}

    t = ScriptedLoop()
    t.register_hooks([Voter(), Voter()])
    with pytest.raises(RuntimeError, match="two hooks vote on the flag 'stop'"):
        t.vote_flags()


def test_periodic_and_time_based_checkpoints_and_the_final_save(tmp_path: Path) -> None:
    checkpointer, state = saver(tmp_path / "a")
    t = ScriptedLoop(max_iter=5)
    t.register_hooks([PeriodicCheckpointer(checkpointer, state, period=2, minutes=0, is_main=True)])
    t.train()
    assert saved_iterations(tmp_path / "a") == [2, 4, 5]
    assert load_file(tmp_path / "a" / "model_0000005.pth")["call"] == 3  # one state per save
    checkpointer, state = saver(tmp_path / "b")
    t = ScriptedLoop(max_iter=3)
    t.register_hooks([PeriodicCheckpointer(checkpointer, state, 0, 1e-9, is_main=True)])  # always due
    t.train()
    assert saved_iterations(tmp_path / "b") == [1, 2, 3]  # the last one saved already: no second save
    checkpointer, state = saver(tmp_path / "c")
    t = ScriptedLoop(max_iter=3)
    t.register_hooks([PeriodicCheckpointer(checkpointer, state, 0, 1e-9, is_main=False)])  # rank 0 decides
    t.train()
    assert saved_iterations(tmp_path / "c") == [3]


def test_a_signal_stops_after_the_step_with_a_checkpoint_and_a_requeue(tmp_path: Path) -> None:
    class SignalAt(HookBase):
        def after_step(self, result: StepResult) -> None:
            if result.iteration == 2:
                os.kill(os.getpid(), signal.SIGUSR1)

    checkpointer, state = saver(tmp_path)
    requeued: list[bool] = []
    flag = StopFlag()
    preemption = PreemptionHook(
        flag, ["SIGUSR1"], checkpointer, state, SingleProcessComm(), lambda: requeued.append(True)
    )
    t = ScriptedLoop(max_iter=10)
    t.register_hooks([SignalAt(), preemption, PeriodicCheckpointer(checkpointer, state, 0, 0, True)])
    assert t.train() == EXIT_PREEMPTED
    assert saved_iterations(tmp_path) == [3] and flag.signal_name == "SIGUSR1"
    assert requeued == [True]  # a scheduler's signal: rank 0 requeues the job
    assert signal.getsignal(signal.SIGUSR1) is signal.SIG_DFL  # handler removed on the way out


def test_evaluation_periodic_final_and_interrupted() -> None:
    calls: list[tuple] = []
    t = ScriptedLoop(max_iter=4)

    def evaluate() -> dict[str, float]:
        calls.append(("eval", t.iteration))
        return {"AP": 0.5}

    def stop() -> None:
        calls.append(("stop", t.iteration))
        raise StopTraining(EXIT_PREEMPTED)

    t.register_hooks([EvalHook(evaluate, 2, True, stop, lambda: calls.append(("draw",)))])
    t.train()
    assert calls == [("eval", 2), ("eval", 4), ("draw",)]  # not twice at the last iteration

    def interrupted() -> dict[str, float]:
        calls.append(("eval", t.iteration))
        raise EvaluationInterrupted("evaluation interrupted by a signal")

    calls.clear()
    t = ScriptedLoop(max_iter=4)
    t.register_hooks([EvalHook(interrupted, 2, True, stop)])
    assert t.train() == EXIT_PREEMPTED and calls == [("eval", 2), ("stop", 2)]


def test_metrics_every_period_and_curves_when_done(tmp_path: Path) -> None:
    writer = MetricsWriter(tmp_path, True, tensorboard=False)
    t = ScriptedLoop(max_iter=5)
    t.register_hooks([MetricsHook(writer, 2, 4, True, tmp_path / "training_curves.png")])
    t.train()
    rows = writer.records
    assert [r["iteration"] for r in rows] == [2, 4, 5]  # every period and the last iteration
    assert rows[0]["loss"] == 1.5 and rows[0]["loss/loss_b"] == 0.5 and rows[0]["images_per_s"] > 0
    assert (tmp_path / "metrics.jsonl").read_text().count("\n") == 3
    assert (tmp_path / "training_curves.png").read_bytes()[:4] == b"\x89PNG"


def test_no_curves_without_plots(tmp_path: Path) -> None:
    """``train.plots=false``: the metrics as usual, no PNG."""
    writer = MetricsWriter(tmp_path, True, tensorboard=False)
    t = ScriptedLoop(max_iter=2)
    t.register_hooks([MetricsHook(writer, 1, 4, True, None)])
    t.train()
    assert [r["iteration"] for r in writer.records] == [1, 2]
    assert not list(tmp_path.glob("*.png"))


def test_the_watchdog_runs_during_training_and_each_step_restarts_its_deadline() -> None:
    watchdog = StallWatchdog(3600, lambda: [], lambda: 0)
    beats: list[float] = []

    class Probe(HookBase):  # registered after the watchdog hook: sees the deadline it just restarted
        def after_step(self, result: StepResult) -> None:
            assert watchdog._thread is not None and watchdog._thread.is_alive()
            beats.append(watchdog._last)

    t = ScriptedLoop(max_iter=3)
    t.register_hooks([StallWatchdogHook(watchdog), Probe()])
    assert t.train() == EXIT_OK
    assert len(beats) == 3 and beats == sorted(beats)
    assert watchdog._thread is None or not watchdog._thread.is_alive()  # stopped on the way out
