"""Layers: Cross-GPU Batch Normalization, the model converter, recomputation-safe checkpointing."""

from megdet_hpc.layers.cgbn import CrossGPUBatchNorm2d, GroupStats, group_statistics
from megdet_hpc.layers.convert import convert_to_cgbn, count_cgbn

__all__ = ["CrossGPUBatchNorm2d", "GroupStats", "convert_to_cgbn", "count_cgbn", "group_statistics"]
