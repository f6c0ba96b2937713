"""The MPI thread level mpi4py needs for the CGBN statistics, checked at start-up (issue 16, item 5)."""

from __future__ import annotations

import pytest
from launchers import collect

from megdet_hpc.distributed.mpi_comm import THREAD_LEVELS, required_thread_level


def test_required_level_per_situation() -> None:
    assert THREAD_LEVELS[required_thread_level(cuda=False, other_mpi_threads=False)] == "funneled"
    assert THREAD_LEVELS[required_thread_level(cuda=True, other_mpi_threads=False)] == "serialized"
    assert THREAD_LEVELS[required_thread_level(cuda=False, other_mpi_threads=True)] == "multiple"


@pytest.mark.parametrize(
    ("launcher", "env"),
    [("mpirun", {"MEGDET_COMM": "mpi"}), ("hvd-mpi", {"MEGDET_CGBN_COMM": "mpi"})],
)
def test_statistics_reduce_from_another_thread(launcher: str, env: dict[str, str]) -> None:
    reps = collect(launcher, 2, ["tests/distributed/mpi_thread_worker.py"], env=env, timeout=180)
    for rep in reps:
        assert rep["stats"] == "mpi" and rep["level"] == "multiple", rep
        assert rep["sum"] == [3.0] * 4


def test_too_low_a_level_beside_horovod_is_a_one_line_error() -> None:
    """Horovod's MPI background thread plus mpi4py need MULTIPLE; with Horovod told to ask for less
    (HOROVOD_MPI_THREADS_DISABLE=1: MPI_THREAD_SINGLE) the comm refuses instead of corrupting MPI."""
    from launchers import run

    proc = run(
        "hvd-mpi",
        2,
        ["tests/distributed/mpi_thread_worker.py"],
        env={"MEGDET_CGBN_COMM": "mpi", "HOROVOD_MPI_THREADS_DISABLE": "1"},
        timeout=180,
        check=False,
    )
    assert proc.returncode != 0
    assert "needs multiple" in proc.stdout + proc.stderr
