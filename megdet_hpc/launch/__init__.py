"""Launching: local launcher command lines, Slurm script generation, the submitit launcher."""
