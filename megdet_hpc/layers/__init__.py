"""Layers: Cross-GPU Batch Normalization and the model converter."""

from megdet_hpc.layers.cgbn import CrossGPUBatchNorm2d, group_statistics
from megdet_hpc.layers.convert import convert_to_cgbn, count_cgbn

__all__ = ["CrossGPUBatchNorm2d", "convert_to_cgbn", "count_cgbn", "group_statistics"]
