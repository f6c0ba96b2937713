"""Launcher detection: one table per launcher, a pure function of the environment."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from megdet_hpc.launch import names, slurm
from megdet_hpc.launch.environment import LOOPBACK, TABLES, detect, job_port
from megdet_hpc.launch.slurm import SlurmError, job_id, master_addr, parse_hostlist


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
    assert (hvd.name, hvd.rank, hvd.size, hvd.local_rank) == ("hvd-gloo", 1, 4, 1) and not hvd.is_mpi
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
    for table in TABLES:
        assert set(table.variables) == {"rank", "size", "local_rank", "local_size"}, table.name


def test_one_vocabulary() -> None:
    """Every table is named in launch.names; a launcher in two lists has one name."""
    assert tuple(t.name for t in TABLES) + (names.LOCAL,) == names.ENVIRONMENTS
    assert set(names.COMM_OF) == set(names.LAUNCH_METHODS)
    shared = set(names.LAUNCH_METHODS) & set(names.ENVIRONMENTS)
    assert shared == {names.HVD_GLOO, names.MPIRUN, names.TORCHRUN}
    assert set(names.STEP_LAUNCHERS) <= set(names.ENVIRONMENTS)


SLURM_STEP = {"SLURM_PROCID": "0", "SLURM_NTASKS": "4", "SLURM_STEP_ID": "0", "SLURM_LOCALID": "0"}


def test_master_address_is_the_tables_business(monkeypatch: pytest.MonkeyPatch) -> None:
    """srun's tables read the node list; launchers on one host say 127.0.0.1; MASTER_ADDR wins."""
    monkeypatch.setattr(shutil, "which", lambda name: None)  # no scontrol: the parser
    step = {**SLURM_STEP, "SLURM_STEP_NODELIST": "node[03-04]", "SLURM_JOB_NODELIST": "node[01-04]"}
    assert detect(step).master_addr(step) == "node03"
    assert detect({**step, "PMIX_RANK": "0"}).master_addr({**step, "PMIX_RANK": "0"}) == "node03"
    job = {**SLURM_STEP, "SLURM_JOB_NODELIST": "gpu-a[7,9]"}
    assert detect(job).master_addr(job) == "gpu-a7"
    assert detect(step).master_addr({**step, "MASTER_ADDR": "head"}) == "head"
    ompi = {"OMPI_COMM_WORLD_RANK": "1", "OMPI_COMM_WORLD_SIZE": "2", "SLURM_JOB_NODELIST": "n[1-2]"}
    assert detect(ompi).master_addr(ompi) == LOOPBACK
    assert detect({}).master_addr({}) == LOOPBACK
    assert master_addr({}) == LOOPBACK
    with pytest.raises(SlurmError, match=r"cannot find the master address: hostlist 'n\[1-'"):
        master_addr({"SLURM_JOB_NODELIST": "n[1-"})


def test_master_address_asks_scontrol_first(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    class Done:
        stdout = "alpha\nbeta\n"

    def fake_run(command, **kwargs):  # type: ignore[no-untyped-def]
        calls.append(command)
        return Done()

    monkeypatch.setattr(shutil, "which", lambda name: "/usr/bin/scontrol")
    monkeypatch.setattr(slurm.subprocess, "run", fake_run)
    assert master_addr({"SLURM_JOB_NODELIST": "x[1-2]"}) == "alpha"
    assert calls == [["scontrol", "show", "hostnames", "x[1-2]"]]


@pytest.mark.parametrize(
    ("expression", "hosts"),
    [
        ("node1", ["node1"]),
        ("node[01-04,07]", ["node01", "node02", "node03", "node04", "node07"]),
        ("a[1-2]b,c", ["a1b", "a2b", "c"]),
        ("tux[1-3],linux[0-1]", ["tux1", "tux2", "tux3", "linux0", "linux1"]),  # Slurm's hostlist docs
        ("n[8-10]", ["n8", "n9", "n10"]),
        ("n[08-10]", ["n08", "n09", "n10"]),  # a range keeps the width of its first number
        ("rack[1-2]-n[1-2]", ["rack1-n1", "rack1-n2", "rack2-n1", "rack2-n2"]),
        ("h-1,h-2", ["h-1", "h-2"]),
        ("n[5]", ["n5"]),
    ],
)
def test_hostlist_expressions(expression: str, hosts: list[str]) -> None:
    assert parse_hostlist(expression) == hosts


@pytest.mark.parametrize("expression", ["n[1-", "n1]", "n[]", "n[a-b]", "n[3-1]", "a,,b", "n[1[2]]", ""])
def test_malformed_hostlists_are_refused(expression: str) -> None:
    with pytest.raises(ValueError, match="hostlist"):
        parse_hostlist(expression)


@pytest.mark.slurm
def test_parser_agrees_with_scontrol(slurm_cluster: Path) -> None:
    """Slurm's own expansion (``scontrol`` on the test cluster's configuration) is the reference."""
    import subprocess

    expression = "node[01-04,07],c,n[8-10]"  # (Slurm 22.05 calls a suffix after brackets invalid)
    proc = subprocess.run(["scontrol", "show", "hostnames", expression], capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.split(), proc.stdout + proc.stderr
    assert parse_hostlist(expression) == proc.stdout.split()


def test_job_port_is_stable_per_job() -> None:
    a = job_port({"SLURM_JOB_ID": "123"})
    assert a == job_port({"SLURM_JOB_ID": "123"}) and 20000 <= a < 50000
    assert a != job_port({"SLURM_JOB_ID": "124"})
    assert job_port({"MASTER_PORT": "29501"}) == 29501


def test_slurm_job_id_is_array_aware() -> None:
    assert job_id({}) is None
    assert job_id({"SLURM_JOB_ID": "7"}) == "7"
    assert job_id({"SLURM_JOB_ID": "9", "SLURM_ARRAY_JOB_ID": "5", "SLURM_ARRAY_TASK_ID": "3"}) == "5_3"


def test_a_requeued_job_gets_its_own_mpi_shared_memory_folder(tmp_path: Path) -> None:
    from megdet_hpc.launch.slurm import separate_mpi_shared_memory

    key = "OMPI_MCA_btl_vader_backing_directory"
    first = {"SLURM_JOB_ID": "10", "SLURM_RESTART_COUNT": "0"}
    assert separate_mpi_shared_memory(first, tmp_path) is None and key not in first  # first run: as is
    again = {"SLURM_JOB_ID": "10", "SLURM_RESTART_COUNT": "1"}
    folder = separate_mpi_shared_memory(again, tmp_path)
    assert folder == tmp_path / "megdet-ompi-10.1" and folder.is_dir() and again[key] == str(folder)
    second_rank = {"SLURM_JOB_ID": "10", "SLURM_RESTART_COUNT": "1"}
    assert separate_mpi_shared_memory(second_rank, tmp_path) == folder  # the folder exists: fine
    mine = {**again, key: "/scratch/mine"}
    assert separate_mpi_shared_memory(mine, tmp_path) is None and mine[key] == "/scratch/mine"
    assert separate_mpi_shared_memory({}, tmp_path) is None  # outside Slurm
