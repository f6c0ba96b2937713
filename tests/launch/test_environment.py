"""Launcher detection: one table per launcher, a pure function of the environment."""

from __future__ import annotations

from megdet_hpc.launch.environment import LAUNCHERS, detect, job_port
from megdet_hpc.launch.slurm import job_id


def test_detect_launchers() -> None:
    assert detect({}).name == "local"
    hvd = detect(
        {
            "HOROVOD_RANK": "1",
            "HOROVOD_SIZE": "4",
            "HOROVOD_LOCAL_RANK": "1",
            "HOROVOD_LOCAL_SIZE": "2",
            "HOROVOD_GLOO_RENDEZVOUS_ADDR": "x",
        }
    )
    assert (hvd.name, hvd.rank, hvd.size, hvd.local_rank) == ("horovodrun-gloo", 1, 4, 1) and not hvd.is_mpi
    ompi = detect(
        {
            "OMPI_COMM_WORLD_RANK": "2",
            "OMPI_COMM_WORLD_SIZE": "8",
            "OMPI_COMM_WORLD_LOCAL_RANK": "0",
            "OMPI_COMM_WORLD_LOCAL_SIZE": "4",
        }
    )
    assert ompi.is_mpi and (ompi.rank, ompi.size, ompi.local_size) == (2, 8, 4)
    slurm = {
        "SLURM_PROCID": "3",
        "SLURM_NTASKS": "4",
        "SLURM_LOCALID": "1",
        "SLURM_STEP_ID": "0",
        "SLURM_NTASKS_PER_NODE": "2",
        "PMIX_RANK": "3",
    }
    s = detect(slurm)
    assert (s.name, s.rank, s.size, s.local_rank, s.local_size, s.is_mpi) == ("srun-pmix", 3, 4, 1, 2, True)
    plain = detect({k: v for k, v in slurm.items() if k != "PMIX_RANK"})
    assert plain.name == "srun" and not plain.is_mpi
    # The batch script itself (no step) is not a rank of a multi-task job.
    assert detect({k: v for k, v in slurm.items() if k != "SLURM_STEP_ID"}).name == "local"
    # A heterogeneous per-node count ("2(x3)") falls back to the default local size.
    assert detect({**slurm, "SLURM_NTASKS_PER_NODE": "2(x3)"}).local_size == 1
    tr = detect({"RANK": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "h", "LOCAL_RANK": "1"})
    assert (tr.name, tr.rank, tr.local_rank, tr.local_size) == ("torchrun", 1, 1, 1)
    sub = detect(
        {"SUBMITIT_LOCAL_GLOBALID": "1", "SUBMITIT_LOCAL_NTASKS": "2", "SUBMITIT_LOCAL_LOCALID": "1"}
    )
    assert (sub.name, sub.rank, sub.size) == ("submitit-local", 1, 2)


def test_every_table_reads_the_four_fields() -> None:
    for table in LAUNCHERS:
        assert set(table.variables) == {"rank", "size", "local_rank", "local_size"}, table.name


def test_job_port_is_stable_per_job() -> None:
    a = job_port({"SLURM_JOB_ID": "123"})
    assert a == job_port({"SLURM_JOB_ID": "123"}) and 20000 <= a < 50000
    assert a != job_port({"SLURM_JOB_ID": "124"})
    assert job_port({"MASTER_PORT": "29501"}) == 29501


def test_slurm_job_id_is_array_aware() -> None:
    assert job_id({}) is None
    assert job_id({"SLURM_JOB_ID": "7"}) == "7"
    assert job_id({"SLURM_JOB_ID": "9", "SLURM_ARRAY_JOB_ID": "5", "SLURM_ARRAY_TASK_ID": "3"}) == "5_3"
