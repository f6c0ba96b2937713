"""The launcher vocabulary: every launcher name the package uses, defined here and imported elsewhere.

Three different things have launcher names, so each has its own constant (and, on the command line,
its own flag):

* ``LAUNCH_METHODS`` -- how ``python -m megdet_hpc.launch local``, ``plan --calibrate``, the tests and
  the benchmarks start ranks on this machine (``--launcher``; ``launch.local`` builds the command).
* ``ENVIRONMENTS`` -- what a started process finds in its environment (``launch.environment``: one
  table per name; ``ClusterEnvironment.name``).  ``horovodrun --mpi`` runs ``mpirun``, so its ranks
  see the ``mpirun`` environment.
* ``STEP_LAUNCHERS`` -- the command an sbatch script starts its tasks with (``launch sbatch
  --step-launcher``).

A launcher that appears in more than one list has the same name in each.
"""

from __future__ import annotations

SINGLE = "single"  # one process, no launcher
HVD_GLOO = "hvd-gloo"  # horovodrun --gloo
HVD_MPI = "hvd-mpi"  # horovodrun --mpi
MPIRUN = "mpirun"
TORCHRUN = "torchrun"  # python -m torch.distributed.run
SUBMITIT_LOCAL = "submitit-local"  # submitit's local executor
SRUN = "srun"
SRUN_PMIX = "srun-pmix"  # srun --mpi=pmix
LOCAL = "local"  # no launcher detected: one process

LAUNCH_METHODS: tuple[str, ...] = (SINGLE, HVD_GLOO, HVD_MPI, MPIRUN, TORCHRUN)
# The comm backend (MEGDET_COMM) that matches each launch method.
COMM_OF: dict[str, str] = {
    SINGLE: "none",
    HVD_GLOO: "horovod",
    HVD_MPI: "horovod",
    MPIRUN: "mpi",
    TORCHRUN: "torch",
}
# Launch methods that start more than one process (plan --calibrate needs two).
MULTI_PROCESS_METHODS: tuple[str, ...] = tuple(m for m in LAUNCH_METHODS if m != SINGLE)

ENVIRONMENTS: tuple[str, ...] = (HVD_GLOO, MPIRUN, TORCHRUN, SUBMITIT_LOCAL, SRUN_PMIX, SRUN, LOCAL)

STEP_LAUNCHERS: tuple[str, ...] = (SRUN, MPIRUN)
