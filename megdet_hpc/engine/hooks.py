"""Training policies as hooks (detectron2's ``engine/hooks.py``), each contributing to the one vote.

Every hook is given what it uses in its constructor -- a checkpointer and the function that builds
the checkpoint's state, an evaluation function, the Slurm requeue, a metrics writer -- and reads
only ``iteration``/``max_iter``/``completed`` from the loop it is registered with, so a test builds a
hook from plain objects and drives it with any ``TrainerBase``.

Order matters and is the order ``TrainingRun.build_hooks`` (``engine/defaults.py``) registers them: the stall watchdog's
beat first (a step's own checkpoint and evaluation count from its end), metrics (so the step a later
hook ends the run at -- the last skipped one, above all -- still reaches ``metrics.jsonl``), the
non-finite guard (the streak must be current before anything is saved), preemption (which ends the
run), the periodic checkpointer and evaluation.  Iterations are numbered as ``metrics.jsonl`` numbers
them: the first step is iteration 1.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn, Protocol

from megdet_hpc.distributed import Comm
from megdet_hpc.engine.metrics import MetricsWriter
from megdet_hpc.engine.signals import StopFlag
from megdet_hpc.engine.train_loop import HookBase, StepResult, StopTraining
from megdet_hpc.engine.watchdog import StallWatchdog
from megdet_hpc.evaluation import EvaluationInterrupted
from megdet_hpc.utils.cli import EXIT_NONFINITE, EXIT_PREEMPTED
from megdet_hpc.utils.logger import progress_bar

log = logging.getLogger("megdet_hpc.engine")

CheckpointState = Callable[[], tuple[dict[str, Any], dict[str, Any]]]
"""Collective: the checkpoint's (state, manifest meta) of the current iteration."""


class CheckpointWriter(Protocol):
    """What the hooks use of ``checkpoint.Checkpointer``."""

    folder: Path
    last_saved_iteration: int | None

    def save(
        self, iteration: int, state: dict[str, Any], meta: dict[str, Any], block: bool = False
    ) -> None: ...

    def wait(self) -> None: ...

    def raise_if_failed(self) -> None: ...


def save_checkpoint(
    checkpointer: CheckpointWriter, state: CheckpointState, iteration: int, block: bool = False
) -> None:
    """Collective: write the current iteration's checkpoint (in the background unless ``block``)."""
    payload, meta = state()
    checkpointer.save(iteration, payload, meta, block=block)


class NonFiniteGuard(HookBase):
    """Count consecutive skipped (non-finite) steps; abort with exit code 4 after ``max_in_a_row``.
    The streak is this hook's state: a resumed run continues counting."""

    def __init__(self, max_in_a_row: int) -> None:
        self.max_in_a_row = max_in_a_row
        self.streak = 0

    def after_step(self, result: StepResult) -> None:
        if not result.skipped:
            self.streak = 0
            return
        self.streak += 1
        msg = (
            f"non-finite loss or gradient at iteration {result.iteration} on at least one rank "
            f"({self.streak} in a row); step skipped, model unchanged"
        )
        log.error(msg)
        if self.streak >= self.max_in_a_row:
            raise StopTraining(
                EXIT_NONFINITE, f"{msg}; aborting after solver.max_nonfinite={self.max_in_a_row}"
            )

    def state_dict(self) -> dict[str, Any]:
        return {"streak": self.streak}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.streak = int(state["streak"])


class MetricsHook(HookBase):
    """Rank 0's progress bar, ``metrics.jsonl`` + TensorBoard every ``period`` steps and at every
    skipped (non-finite) step, and the training curves (``curves``, a PNG) when the run completes."""

    def __init__(
        self,
        writer: MetricsWriter,
        period: int,
        images_per_step: int,
        is_main: bool,
        curves: Path | None,
    ) -> None:
        self.writer = writer
        self.period = period
        self.images_per_step = images_per_step
        self.is_main = is_main
        self.curves = curves
        self._bar = None
        self._window_start = 0.0
        self._window_images = 0

    def before_train(self) -> None:
        t = self.trainer
        self._bar = progress_bar(t.max_iter, "train", self.is_main, initial=t.iteration, unit="it")
        self._window_start, self._window_images = time.perf_counter(), 0

    def after_step(self, result: StepResult) -> None:
        self._window_images += self.images_per_step
        if self._bar is not None:
            self._bar.update(1)
        on_period = result.iteration % self.period == 0 or result.iteration == self.trainer.max_iter
        if not (on_period or result.skipped):  # every skipped step is recorded: the abort's last one too
            return
        elapsed = max(time.perf_counter() - self._window_start, 1e-9)
        steps = max(self._window_images / self.images_per_step, 1)
        record = {"iteration": result.iteration, "images_seen": result.images_seen, "lr": result.lr}
        if result.skipped:  # its losses were not finite on some rank: there is nothing to plot
            record["skipped"] = True
        else:
            record.update({"loss": result.loss, **{f"loss/{k}": v for k, v in result.losses.items()}})
        record.update({"images_per_s": self._window_images / elapsed, "s_per_iter": elapsed / steps})
        self.writer.write(record)
        if self._bar is not None:
            self._bar.set_postfix(
                loss=f"{result.loss:.3f}",
                lr=f"{result.lr:.4f}",
                ips=f"{record['images_per_s']:.1f}",
                refresh=False,
            )
        self._window_start, self._window_images = time.perf_counter(), 0

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if self.trainer.completed and self.is_main:
            plot = self.writer.plot(self.curves) if self.curves is not None else None
            where = f"; curves in {plot}" if plot is not None else ""
            log.info("training done: %d iterations%s", self.trainer.iteration, where)


class StallWatchdogHook(HookBase):
    """Runs a ``StallWatchdog`` during training: every completed step restarts its deadline (first in
    the hook list, so a step's own checkpoint and evaluation count from its end)."""

    def __init__(self, watchdog: StallWatchdog) -> None:
        self.watchdog = watchdog

    def before_train(self) -> None:
        self.watchdog.start()

    def after_step(self, result: StepResult) -> None:
        self.watchdog.beat()

    def close(self) -> None:
        self.watchdog.stop()


class PreemptionHook(HookBase):
    """Signals only set ``stop_flag``; the step's vote makes every rank stop after the same step:
    checkpoint (unless this iteration is saved already), ``requeue`` on rank 0 when the signal asks
    for it, and exit code 3 on every rank.  ``stop`` is also what an interrupted evaluation calls."""

    def __init__(
        self,
        stop_flag: StopFlag,
        signals: Sequence[str],
        checkpointer: CheckpointWriter,
        state: CheckpointState,
        comm: Comm,
        requeue: Callable[[], None] | None,
    ) -> None:
        self.stop_flag = stop_flag
        self.signals = signals
        self.checkpointer = checkpointer
        self.state = state
        self.comm = comm
        self.requeue = requeue

    def before_train(self) -> None:
        self.stop_flag.install(self.signals)

    def vote_flags(self) -> dict[str, bool]:
        return {"stop": self.stop_flag.raised}

    def after_step(self, result: StepResult) -> None:
        if result.flags.get("stop"):
            self.stop()

    def stop(self) -> NoReturn:
        """Collective: checkpoint, requeue (rank 0), and end training with ``EXIT_PREEMPTED``."""
        iteration = self.trainer.iteration
        if self.checkpointer.last_saved_iteration != iteration:
            save_checkpoint(self.checkpointer, self.state, iteration, block=True)
        self.checkpointer.wait()
        if self.comm.is_main:
            log.warning(
                "stopped by %s at iteration %d: checkpoint written to %s",
                self.stop_flag.signal_name or "a peer's signal",
                iteration,
                self.checkpointer.folder,
            )
            if self.requeue is not None and self.stop_flag.requeue:
                self.requeue()
        self.comm.barrier()
        raise StopTraining(EXIT_PREEMPTED)

    def close(self) -> None:
        self.stop_flag.uninstall()


class PeriodicCheckpointer(HookBase):
    """Checkpoint every ``period`` iterations and/or every ``minutes`` of rank 0's clock (a vote flag,
    so the time-based save happens at the same iteration on every rank without a collective of its
    own), and once more at the end."""

    def __init__(
        self,
        checkpointer: CheckpointWriter,
        state: CheckpointState,
        period: int,
        minutes: float,
        is_main: bool,
    ) -> None:
        self.checkpointer = checkpointer
        self.state = state
        self.period = period
        self.minutes = minutes
        self.is_main = is_main
        self._last = time.monotonic()

    def vote_flags(self) -> dict[str, bool]:
        due = self.minutes > 0 and time.monotonic() - self._last >= self.minutes * 60
        return {"checkpoint_time": self.is_main and due}

    def after_step(self, result: StepResult) -> None:
        self.checkpointer.raise_if_failed()
        by_iteration = self.period > 0 and result.iteration % self.period == 0
        if by_iteration or result.flags.get("checkpoint_time"):
            save_checkpoint(self.checkpointer, self.state, result.iteration)
            self._last = time.monotonic()

    def after_train(self) -> None:
        iteration = self.trainer.iteration
        if self.checkpointer.last_saved_iteration != iteration:
            save_checkpoint(self.checkpointer, self.state, iteration, block=True)
        self.checkpointer.wait()  # the final checkpoint is on disk before the final evaluation


class EvalHook(HookBase):
    """Evaluate every ``period`` iterations and at the end (``evaluate`` records and logs); a
    preemption signal interrupts an evaluation between batches (a COCO-size evaluation can outlast the
    signal's lead time) and ``on_interrupt`` -- the preemption's ``stop`` -- ends the run.  At the end,
    ``draw`` (rank 0) draws predictions."""

    def __init__(
        self,
        evaluate: Callable[[], dict[str, Any]],
        period: int,
        at_end: bool,
        on_interrupt: Callable[[], NoReturn],
        draw: Callable[[], Any] | None = None,
    ) -> None:
        self.evaluate = evaluate
        self.period = period
        self.at_end = at_end
        self.on_interrupt = on_interrupt
        self.draw = draw

    def _evaluate(self) -> None:
        try:
            self.evaluate()
        except EvaluationInterrupted:
            self.on_interrupt()

    def after_step(self, result: StepResult) -> None:
        due = self.period and result.iteration % self.period == 0 and result.iteration < self.trainer.max_iter
        if due:
            self._evaluate()

    def after_train(self) -> None:
        if not self.at_end:
            return
        self._evaluate()
        if self.draw is not None:
            self.draw()
