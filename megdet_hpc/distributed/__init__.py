"""Distributed communication: the backend-neutral ``Comm`` every collective goes through.

``init()`` detects the launcher (``megdet_hpc.launch.environment``) and builds the process-wide comm;
``stats_comm()`` is the transport of CGBN statistics; ``grad_sync`` averages gradients per backend.
"""

from megdet_hpc.distributed.comm import (
    Comm,
    CommError,
    Group,
    active_comms,
    get,
    init,
    make_comm,
    run_with_comm,
    shutdown,
    stats_comm,
)

__all__ = [
    "Comm",
    "CommError",
    "Group",
    "active_comms",
    "get",
    "init",
    "make_comm",
    "run_with_comm",
    "shutdown",
    "stats_comm",
]
