"""Distributed communication: launcher detection and the backend-neutral ``Comm``."""

from megdet_hpc.distributed.comm import Comm, CommError, Group, get, init, make_comm, shutdown, stats_comm
from megdet_hpc.distributed.env import ClusterEnvironment, detect

__all__ = [
    "ClusterEnvironment",
    "Comm",
    "CommError",
    "Group",
    "detect",
    "get",
    "init",
    "make_comm",
    "shutdown",
    "stats_comm",
]
