"""Checkpoint-restart: atomic files with manifests, background saving, resume with fallback."""

from megdet_hpc.checkpoint.checkpointer import Checkpointer
from megdet_hpc.checkpoint.io import CheckpointError, candidates, load_file, verify, write_checkpoint

__all__ = ["CheckpointError", "Checkpointer", "candidates", "load_file", "verify", "write_checkpoint"]
