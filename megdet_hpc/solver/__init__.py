"""Solver: the LR policy (linear scaling + warmup + steps, a function of images seen) and SGD."""

from megdet_hpc.solver.optimizer import build_optimizer
from megdet_hpc.solver.schedule import LRSchedule, plot_schedule

__all__ = ["LRSchedule", "build_optimizer", "plot_schedule"]
