"""Comm primitives on real processes for each backend, and launcher detection."""

from __future__ import annotations

import json

import pytest
from launchers import run

from megdet_hpc.distributed.comm import CommError, resolve_backend
from megdet_hpc.launch.environment import detect, job_port


def test_stats_comm_on_mpi4py_under_horovod_mpi(tmp_path) -> None:
    run(
        "hvd-mpi",
        2,
        ["tests/distributed/comm_worker.py", str(tmp_path)],
        env={"MEGDET_CGBN_COMM": "mpi"},
        timeout=180,
    )
    rep = json.loads((tmp_path / "rank0.json").read_text())
    assert rep["backend"] == "horovod" and rep["stats_comm"] == "mpi"


@pytest.mark.parametrize("launcher", ["hvd-gloo", "hvd-mpi", "mpirun", "torchrun"])
def test_primitives(tmp_path, launcher: str) -> None:
    n = 4
    run(launcher, n, ["tests/distributed/comm_worker.py", str(tmp_path)], timeout=180)
    reps = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(n)]
    for r, rep in enumerate(reps):
        assert rep["size"] == n and rep["rank"] == r
        assert rep["allreduce"] == [10.0] * 5  # 1+2+3+4
        first = (r // 2) * 2
        assert rep["pair_ranks"] == [first, first + 1]
        assert rep["pair"] == [float(2 * first + 3)] * 3
        assert rep["broadcast"] == [float(n - 1)] * 4
        assert rep["objs"] == [{"rank": i} for i in range(n)]
        assert rep["bobj"] == {"from": 0}
        assert rep["coalesced_ok"], rep
        assert rep["pair_coalesced"] == [float(2 * first + 3)] * 4
        assert rep["calls"]["allreduce"] == 4  # a coalesced list counts as one collective
    # CGBN statistics ride the training comm by default (bench/cgbn.py measured it fastest).
    assert reps[0]["stats_comm"] == rep["backend"]


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
    assert (hvd.name, hvd.rank, hvd.size, hvd.local_rank) == ("horovodrun-gloo", 1, 4, 1)
    ompi = detect(
        {
            "OMPI_COMM_WORLD_RANK": "2",
            "OMPI_COMM_WORLD_SIZE": "8",
            "OMPI_COMM_WORLD_LOCAL_RANK": "0",
            "OMPI_COMM_WORLD_LOCAL_SIZE": "4",
        }
    )
    assert ompi.is_mpi and (ompi.rank, ompi.size) == (2, 8)
    slurm = {
        "SLURM_PROCID": "3",
        "SLURM_NTASKS": "4",
        "SLURM_LOCALID": "1",
        "SLURM_STEP_ID": "0",
        "SLURM_NTASKS_PER_NODE": "2",
        "PMIX_RANK": "3",
    }
    s = detect(slurm)
    assert (s.name, s.rank, s.size, s.local_rank, s.local_size) == ("srun-pmix", 3, 4, 1, 2)
    # The batch script itself (no step) is not a rank of a multi-task job.
    assert detect({k: v for k, v in slurm.items() if k != "SLURM_STEP_ID"}).name == "local"
    tr = detect({"RANK": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "h", "LOCAL_RANK": "1"})
    assert (tr.name, tr.rank) == ("torchrun", 1)


def test_backend_resolution_and_errors() -> None:
    local = detect({})
    assert resolve_backend("auto", local) == "none"
    tr = detect({"RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "h"})
    assert resolve_backend("auto", tr) == "torch"
    ompi = detect({"OMPI_COMM_WORLD_RANK": "0", "OMPI_COMM_WORLD_SIZE": "2"})
    assert resolve_backend("auto", ompi) == "horovod"
    with pytest.raises(CommError, match="MEGDET_COMM='nccl' is not one of"):
        resolve_backend("nccl", local)


def test_job_port_is_stable_per_job() -> None:
    a = job_port({"SLURM_JOB_ID": "123"})
    assert a == job_port({"SLURM_JOB_ID": "123"}) and 20000 <= a < 50000
    assert a != job_port({"SLURM_JOB_ID": "124"})
    assert job_port({"MASTER_PORT": "29501"}) == 29501


def test_unique_names_count_per_prefix() -> None:
    from megdet_hpc.distributed.single import SingleProcessComm

    comm = SingleProcessComm(detect({}))
    assert [comm.unique_name("cgbn") for _ in range(3)] == ["cgbn.1", "cgbn.2", "cgbn.3"]
    assert comm.unique_name("other") == "other.1"
