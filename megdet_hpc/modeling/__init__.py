"""Modeling: the Faster R-CNN FPN detector with CGBN."""

from megdet_hpc.modeling.detector import build_model
from megdet_hpc.modeling.sampling import set_sampling_keys

__all__ = ["build_model", "set_sampling_keys"]
