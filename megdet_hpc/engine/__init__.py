"""Engine: the training loop, batch planning, metrics and preemption signals."""

from megdet_hpc.engine.trainer import Trainer, requeue_slurm_job

__all__ = ["Trainer", "requeue_slurm_job"]
