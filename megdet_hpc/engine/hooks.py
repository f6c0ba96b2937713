"""Training policies as hooks (detectron2's ``engine/hooks.py``), each contributing to the one vote.

Order matters and is the order ``Trainer.build_hooks`` registers them: the stall watchdog's beat
first (a step's own checkpoint and evaluation count from its end), metrics (so the step a later hook
ends the run at -- the last skipped one, above all -- still reaches ``metrics.jsonl``), the non-finite
guard (the streak must be current before anything is saved), preemption (which ends the run), the
periodic checkpointer and evaluation.  Iterations are numbered as ``metrics.jsonl`` numbers them: the
first step is iteration 1.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

from megdet_hpc.engine.train_loop import HookBase, StepResult, StopTraining
from megdet_hpc.utils.cli import EXIT_NONFINITE
from megdet_hpc.utils.logger import progress_bar

if TYPE_CHECKING:
    from megdet_hpc.engine.trainer import Trainer

log = logging.getLogger("megdet_hpc.engine")


class NonFiniteGuard(HookBase):
    """Count consecutive skipped (non-finite) steps; abort with exit code 4 after ``max_in_a_row``."""

    trainer: Trainer

    def __init__(self, max_in_a_row: int) -> None:
        self.max_in_a_row = max_in_a_row

    def after_step(self, result: StepResult) -> None:
        progress = self.trainer.progress
        if not result.skipped:
            progress.nonfinite_streak = 0
            return
        progress.nonfinite_streak += 1
        msg = (
            f"non-finite loss or gradient at iteration {result.iteration} on at least one rank "
            f"({progress.nonfinite_streak} in a row); step skipped, model unchanged"
        )
        log.error(msg)
        if progress.nonfinite_streak >= self.max_in_a_row:
            raise StopTraining(
                EXIT_NONFINITE, f"{msg}; aborting after solver.max_nonfinite={self.max_in_a_row}"
            )


class MetricsHook(HookBase):
    """Rank 0's progress bar, ``metrics.jsonl`` + TensorBoard every ``period`` steps and at every
    skipped (non-finite) step, and the training curves (PNG) when the run completes."""

    trainer: Trainer

    def __init__(self, period: int) -> None:
        self.period = period
        self._bar = None
        self._window_start = 0.0
        self._window_images = 0

    def before_train(self) -> None:
        t = self.trainer
        self._bar = progress_bar(t.max_iter, "train", t.comm.is_main, initial=t.iteration, unit="it")
        self._window_start, self._window_images = time.perf_counter(), 0

    def after_step(self, result: StepResult) -> None:
        t = self.trainer
        self._window_images += t.batch.total
        if self._bar is not None:
            self._bar.update(1)
        on_period = result.iteration % self.period == 0 or result.iteration == t.max_iter
        if not (on_period or result.skipped):  # every skipped step is recorded: the abort's last one too
            return
        elapsed = max(time.perf_counter() - self._window_start, 1e-9)
        steps = max(self._window_images / t.batch.total, 1)
        record = {"iteration": result.iteration, "images_seen": result.images_seen, "lr": result.lr}
        if result.skipped:  # its losses were not finite on some rank: there is nothing to plot
            record["skipped"] = True
        else:
            record.update({"loss": result.loss, **{f"loss/{k}": v for k, v in result.losses.items()}})
        record.update({"images_per_s": self._window_images / elapsed, "s_per_iter": elapsed / steps})
        t.metrics.write(record)
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
        t = self.trainer
        if t.completed and t.comm.is_main:
            plot = t.metrics.plot(t.output_dir / "training_curves.png")
            log.info("training done: %d iterations; curves in %s", t.iteration, plot)


class StallWatchdogHook(HookBase):
    """Runs the trainer's ``StallWatchdog`` during training: every completed step restarts its deadline
    (first in the hook list, so a step's own checkpoint and evaluation count from its end)."""

    trainer: Trainer

    def before_train(self) -> None:
        self.trainer.watchdog.start()

    def after_step(self, result: StepResult) -> None:
        self.trainer.watchdog.beat()

    def close(self) -> None:
        self.trainer.watchdog.stop()


class PreemptionHook(HookBase):
    """Signals only set a flag; the step's vote makes every rank stop after the same step, rank 0
    writes a checkpoint and requeues the Slurm job, and every rank exits with code 3."""

    trainer: Trainer

    def __init__(self, signals: list[str]) -> None:
        self.signals = signals

    def before_train(self) -> None:
        self.trainer.stop_flag.install(self.signals)

    def vote_flags(self) -> dict[str, bool]:
        return {"stop": self.trainer.stop_flag.raised}

    def after_step(self, result: StepResult) -> None:
        if result.flags.get("stop"):
            self.trainer.preempt()

    def close(self) -> None:
        self.trainer.stop_flag.uninstall()


class PeriodicCheckpointer(HookBase):
    """Checkpoint every ``period`` iterations and/or every ``minutes`` of rank 0's clock (a vote flag,
    so the time-based save happens at the same iteration on every rank without a collective of its
    own), and once more at the end."""

    trainer: Trainer

    def __init__(self, period: int, minutes: float) -> None:
        self.period = period
        self.minutes = minutes
        self._last = time.monotonic()

    def vote_flags(self) -> dict[str, bool]:
        due = self.minutes > 0 and time.monotonic() - self._last >= self.minutes * 60
        return {"checkpoint_time": self.trainer.comm.is_main and due}

    def after_step(self, result: StepResult) -> None:
        t = self.trainer
        t.checkpointer.raise_if_failed()
        by_iteration = self.period > 0 and result.iteration % self.period == 0
        if by_iteration or result.flags.get("checkpoint_time"):
            t.save_checkpoint()
            self._last = time.monotonic()

    def after_train(self) -> None:
        t = self.trainer
        if t.checkpointer.last_saved_iteration != t.iteration:
            t.save_checkpoint(block=True)
        t.checkpointer.wait()  # the final checkpoint is on disk before the final evaluation


class EvalHook(HookBase):
    """Evaluate every ``period`` iterations and at the end; a preemption signal interrupts an
    evaluation between batches (a COCO-size evaluation can outlast the signal's lead time)."""

    trainer: Trainer

    def __init__(self, period: int, at_end: bool, vis_images: int) -> None:
        self.period = period
        self.at_end = at_end
        self.vis_images = vis_images

    def after_step(self, result: StepResult) -> None:
        t = self.trainer
        due = self.period and result.iteration % self.period == 0 and result.iteration < t.max_iter
        if due and t.run_eval() is None:
            t.preempt()

    def after_train(self) -> None:
        t = self.trainer
        if not self.at_end:
            return
        if t.run_eval() is None:
            t.preempt()
        if self.vis_images and t.comm.is_main:
            t.draw_predictions(self.vis_images)
