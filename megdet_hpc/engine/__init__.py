"""Engine: the training loop and hooks, the MegDet trainer, batch planning, metrics and signals."""

from megdet_hpc.engine.train_loop import HookBase, StepResult, StopTraining, TrainerBase
from megdet_hpc.engine.trainer import Trainer

__all__ = ["HookBase", "StepResult", "StopTraining", "Trainer", "TrainerBase"]
