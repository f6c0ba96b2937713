"""Comm primitives on real processes for each backend, and backend resolution."""

from __future__ import annotations

import pytest
from launchers import collect

from megdet_hpc.distributed.comm import CommError, resolve_backend
from megdet_hpc.launch.environment import detect


def test_stats_comm_on_mpi4py_under_horovod_mpi() -> None:
    rep = collect(
        "hvd-mpi", 2, ["tests/distributed/comm_worker.py"], env={"MEGDET_CGBN_COMM": "mpi"}, timeout=180
    )[0]
    assert rep["backend"] == "horovod" and rep["stats_comm"] == "mpi"


@pytest.mark.parametrize("launcher", ["hvd-gloo", "hvd-mpi", "mpirun", "torchrun"])
def test_primitives(launcher: str) -> None:
    n = 4
    reps = collect(launcher, n, ["tests/distributed/comm_worker.py"], timeout=180)
    assert len(reps) == n
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
        # A peer frozen while this rank's backward enqueues gradients (Horovod's hooks, DDP's buckets)
        # is named by the stall watchdog; the mpi path reduces after backward, outside it.
        during = {
            "horovod": "allreduce megdet.gradients (hvd.DistributedOptimizer hooks, during backward)",
            "torch": "allreduce megdet.gradients (DDP buckets, during backward)",
            "mpi": None,
        }[rep["backend"]]
        assert rep["backward_marks"] == [None, during], rep["backward_marks"]
    # CGBN statistics ride the training comm by default (bench/cgbn.py measured it fastest).
    assert reps[0]["stats_comm"] == rep["backend"]


def test_backend_resolution_and_errors() -> None:
    local = detect({})
    assert resolve_backend("auto", local) == "none"
    tr = detect({"RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "h"})
    assert resolve_backend("auto", tr) == "torch"
    ompi = detect({"OMPI_COMM_WORLD_RANK": "0", "OMPI_COMM_WORLD_SIZE": "2"})
    assert resolve_backend("auto", ompi) == "horovod"
    with pytest.raises(CommError, match="MEGDET_COMM='nccl' is not one of"):
        resolve_backend("nccl", local)


def test_unique_names_count_per_prefix() -> None:
    from megdet_hpc.distributed.single import SingleProcessComm

    comm = SingleProcessComm()
    assert [comm.unique_name("cgbn") for _ in range(3)] == ["cgbn.1", "cgbn.2", "cgbn.3"]
    assert comm.unique_name("other") == "other.1"
