"""The CGBN statistics on a torch.distributed group of their own (``MEGDET_CGBN_COMM=nccl``; gloo,
``torch-gloo``, stands in for NCCL on CPU), formed under horovodrun, mpirun, torchrun and srun beside
the training comm, give the same CGBN results as the default transport (issue 16, deliverable 2)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from launchers import REPO, collect, run

from megdet_hpc.distributed.comm import CommError, stats_mode
from megdet_hpc.launch.local import REPORT_DIR

WORKER = "tests/distributed/stats_group_worker.py"


def assert_same_layer(a: list[dict], b: list[dict]) -> None:
    for ra, rb in zip(a, b, strict=True):
        for key in ("y", "gx", "gwb", "running"):
            worst = max(abs(u - v) for u, v in zip(ra[key], rb[key], strict=True))
            assert worst <= 1e-6, (key, worst)


@pytest.mark.parametrize(
    ("launcher", "env", "training_comm"),
    [
        ("hvd-gloo", {}, "horovod"),
        ("hvd-mpi", {}, "horovod"),
        ("mpirun", {"MEGDET_COMM": "mpi"}, "mpi"),
        ("torchrun", {}, "torch"),
    ],
)
def test_statistics_group_beside_the_training_comm(launcher: str, env: dict, training_comm: str) -> None:
    default = collect(launcher, 2, [WORKER, "0"], env={**env, "MEGDET_CGBN_COMM": "main"}, timeout=180)
    group = collect(launcher, 2, [WORKER, "0"], env={**env, "MEGDET_CGBN_COMM": "torch-gloo"}, timeout=180)
    for rep in group:
        assert rep["comm"] == training_comm and rep["stats"] == "torch-gloo" and not rep["same_object"]
        assert rep["stats_calls"] == 2  # forward + backward of the layer; the gradients went elsewhere
    assert default[0]["stats"] == training_comm
    assert_same_layer(default, group)


def test_bn_groups_on_the_statistics_group() -> None:
    """4 ranks, BN groups of 2: the subgroups are torch groups of the statistics' backend."""
    default = collect("hvd-gloo", 4, [WORKER, "2"], env={"MEGDET_CGBN_COMM": "main"}, timeout=240)
    group = collect("hvd-gloo", 4, [WORKER, "2"], env={"MEGDET_CGBN_COMM": "torch-gloo"}, timeout=240)
    assert_same_layer(default, group)
    assert default[0]["y"] != default[2]["y"]  # the two groups really normalise separately


# -- srun on the one-node test cluster ---------------------------------------------------------------
def _running_one_node_cluster() -> str | None:
    """The slurm.conf of a running one-node test cluster (scripts/slurm_cluster.sh, port 16817) that
    answers ``scontrol ping``: other sessions start one on the same ports, so reuse it."""
    ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    for conf in re.findall(r"slurmctld\s+(?:-\S+\s+)*-f\s+(\S+)", ps):
        try:
            text = Path(conf).read_text()
        except OSError:
            continue
        if "SlurmctldPort=16817" not in text:
            continue
        ping = subprocess.run(
            ["scontrol", "ping"], env={**os.environ, "SLURM_CONF": conf}, capture_output=True, text=True
        )
        if "UP" in ping.stdout:
            return conf
    return None


@pytest.fixture(scope="module")
def slurm_conf() -> Iterator[str]:
    conf = _running_one_node_cluster()
    if conf is not None:
        yield conf
        return
    folder = tempfile.mkdtemp(prefix="megdet-slurm-")
    script = REPO / "scripts" / "slurm_cluster.sh"
    subprocess.run(["bash", str(script), "start", folder], check=True, capture_output=True, timeout=120)
    try:
        yield str(Path(folder) / "slurm.conf")
    finally:
        subprocess.run(["bash", str(script), "stop", folder], capture_output=True, timeout=60)


def srun_collect(conf: str, mode: str) -> list[dict]:
    with tempfile.TemporaryDirectory(prefix="megdet-report-") as folder:
        env = {
            **os.environ,
            "SLURM_CONF": conf,
            "OMP_NUM_THREADS": "1",
            "PYTHONPATH": str(REPO),
            "MEGDET_CGBN_COMM": mode,
            REPORT_DIR: folder,
        }
        env.pop("MEGDET_COMM", None)
        proc = subprocess.run(
            ["srun", "--mpi=pmix", "-n", "2", "-c", "1", "-t", "5", sys.executable, WORKER, "0"],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=240,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        files = sorted(Path(folder).glob("rank*.json"))
        return [json.loads(p.read_text()) for p in files]


def test_statistics_group_under_srun(slurm_conf: str) -> None:
    """srun --mpi=pmix: Horovod over MPI is the training comm; the statistics group rendezvouses
    through it."""
    default = srun_collect(slurm_conf, "main")
    group = srun_collect(slurm_conf, "torch-gloo")
    assert len(group) == 2 and group[0]["comm"] == "horovod" and group[0]["stats"] == "torch-gloo"
    assert_same_layer(default, group)


# -- validation ----------------------------------------------------------------------------------------
def test_bad_value_is_a_one_line_error(tiny_config, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MEGDET_CGBN_COMM", "ncl")
    with pytest.raises(CommError, match=r"MEGDET_CGBN_COMM='ncl' is not one of main, mpi, nccl, torch-gloo"):
        stats_mode()
    proc = run(
        "single",
        1,
        ["-m", "megdet_hpc.train", "--config", str(tiny_config())],
        env={"MEGDET_CGBN_COMM": "ncl"},
        check=False,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("megdet_hpc.train: error: MEGDET_CGBN_COMM='ncl'")


def test_nccl_without_cuda_says_what_stands_in(monkeypatch: pytest.MonkeyPatch) -> None:
    """On this CPU machine: ``nccl`` is refused with a pointer to ``torch-gloo`` (2 ranks needed for
    the group to be built at all)."""
    proc = run("hvd-gloo", 2, [WORKER, "0"], env={"MEGDET_CGBN_COMM": "nccl"}, check=False, timeout=180)
    assert proc.returncode != 0
    assert (
        "MEGDET_CGBN_COMM=nccl needs CUDA (on CPU, torch-gloo stands in for it)" in proc.stdout + proc.stderr
    )
