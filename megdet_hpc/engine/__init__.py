"""Engine: the training loop and hooks (``train_loop``, ``hooks``), one optimizer step from explicit
parts (``step.SimpleTrainer``), a run built from a config (``defaults``), batch planning, metrics,
signals and the stall watchdog."""

from megdet_hpc.engine.defaults import TrainingRun, build_run
from megdet_hpc.engine.step import SimpleTrainer
from megdet_hpc.engine.train_loop import HookBase, StepResult, StopTraining, TrainerBase

__all__ = [
    "HookBase",
    "SimpleTrainer",
    "StepResult",
    "StopTraining",
    "TrainerBase",
    "TrainingRun",
    "build_run",
]
