"""megdet_hpc: MegDet-style large mini-batch object detection on SLURM/MPI clusters.

Cross-GPU Batch Normalization (CGBN) over Horovod / torch.distributed / MPI, a Faster R-CNN FPN
detector, the linear-scaling warmup LR policy, checkpoint-restart that survives preemption, and
launchers for Slurm, submitit and horovodrun.
"""

__version__ = "0.1.0"
