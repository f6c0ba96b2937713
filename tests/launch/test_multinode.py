"""Across nodes, on a real multi-node Slurm cluster on this machine (``tests/multinode.py``).

Every launch path trains the demo model on tiny images with 2 nodes x 2 tasks and must (a) really run
on two hosts -- the trainer logs every rank's host, ``4 rank(s) on 2 host(s): node1: 0,1; node2: 2,3``
-- and (b) end with the weights of the same total batch trained on one node (``mpirun -np 4`` here,
fp32, 1e-5).  The torch.distributed path can only pass with the master address taken from the node
list: each node has its own loopback, so ``127.0.0.1`` would never meet.  Then the failures that only
exist between hosts: preemption of a 2-node job, a rank frozen with SIGSTOP, a node's link taken down,
a node lost (its slurmd and tasks killed).  Bounds are asserted as generous hang guards; the measured
values are printed (``-s``) and stated in the README's "What happens when..." table.
"""

from __future__ import annotations

import hashlib
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import TINY_OVERRIDES, write_tiny_config
from launchers import REPO, run
from multinode import MultiNodeCluster

from megdet_hpc.checkpoint.io import verify
from megdet_hpc.launch.resources import SlurmResources
from megdet_hpc.launch.sbatch import SlurmJob, render

pytestmark = pytest.mark.slurm

ITERS = 6
HOSTS_LINE = "4 rank(s) on 2 host(s): node1: 0,1; node2: 2,3"
HANG_GUARD = 300  # seconds: far above every bound measured here, far below a wall time
STALL_S = 30  # train.stall_timeout_s of the fault tests: 10x a step on an idle 2-core machine
LINK_STALL_S = 10  # the link-down test: below SlurmdTimeout (30 s), after which Slurm requeues the job


def write_config(folder: Path, data: Path, group: int = 0, **train: object) -> Path:
    """The tiny demo config for 4 ranks x 1 image (total batch 4), ``ITERS`` steps, a checkpoint every 2."""
    folder.mkdir(parents=True, exist_ok=True)
    return write_tiny_config(
        folder,
        data,
        "cfg.yaml",
        model={**TINY_OVERRIDES["model"], "bn_group_size": group},
        solver={
            **TINY_OVERRIDES["solver"],
            "total_batch": 4,
            "base_batch": 4,
            "max_iter": ITERS,
            "warmup_iters": 2,
            "steps": [4],
        },
        data={"images_per_gpu": 1, "num_workers": 0},
        train={**TINY_OVERRIDES["train"], "checkpoint_period": 2, "eval_at_end": False, **train},
    )


def job_script(folder: Path, launcher: str = "srun") -> Path:
    """The one template, for 2 nodes x 2 (fake) GPUs: ``--nodes=2 --ntasks-per-node=2 --gpus-per-task=1``."""
    job = SlurmJob(
        SlurmResources.for_gpus(4, 2, cpus_per_task=1, time="00:15:00", partition="low", signal_lead_s=60),
        images_per_gpu=1,
        step_launcher=launcher,
    )
    path = folder / f"job_{launcher}.sh"
    path.write_text(render(job))
    return path


def sbatch(cluster: MultiNodeCluster, script: Path, cfg: Path, wait: bool = True, **env: str):
    """Submit ``script``; with ``wait``, follow it to its end and return its exit code as the
    ``returncode`` (our own 0.5 s poll: ``sbatch --wait`` backs off to 30 s between polls)."""
    proc = subprocess.run(
        ["sbatch", "--parsable", str(script)],
        cwd=script.parent,
        capture_output=True,
        text=True,
        env=cluster.env(MEGDET_CONFIG=str(cfg), MEGDET_OUTPUT_DIR=str(cfg.parent / "out"), **env),
        timeout=60,
    )
    if not wait or proc.returncode != 0:
        return proc
    job = proc.stdout.strip().split(";")[0]
    cluster.wait_gone(job, HANG_GUARD)
    code = job_field(cluster, job, "ExitCode").split(":")[0]
    return subprocess.CompletedProcess(
        proc.args, int(code) if code.isdigit() else -1, proc.stdout, proc.stderr
    )


def job_log(folder: Path) -> str:
    return "\n".join(p.read_text(errors="replace") for p in sorted(folder.glob("*.out")))


def final_state(out: Path) -> dict:
    return torch.load(out / f"model_{ITERS:07d}.pth", weights_only=True)


def max_difference(a: dict, b: dict) -> float:
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a if a[k].numel())


def assert_matches(out: Path, reference: Path, exact: bool = False) -> None:
    state, ref = final_state(out), final_state(reference)
    assert state["iteration"] == ITERS and state["world_size"] == 4 and state["total_batch"] == 4
    worst = max_difference(state["model"], ref["model"])
    print(f"{out}: max |w - w_one_node| = {worst:.3g}")
    if exact:
        assert worst == 0.0
    assert worst <= 1e-5, worst


def assert_checkpoints_intact(out: Path) -> dict[str, str]:
    """Every checkpoint has its manifest and matches it; ``last_checkpoint`` names one of them."""
    files = sorted(out.glob("model_*.pth"))
    assert files, f"no checkpoint in {out}"
    for path in files:
        assert verify(path).get("manifest", True), path
    assert (out / (out / "last_checkpoint").read_text().strip()).is_file()
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def iteration_of(out: Path) -> int:
    metrics = out / "metrics.jsonl"
    if not metrics.exists():
        return 0
    its = [int(m) for m in re.findall(r'"iteration": (\d+)', metrics.read_text())]
    return max(its, default=0)


def wait_iteration(out: Path, at_least: int, cluster: MultiNodeCluster, job: str) -> None:
    deadline = time.monotonic() + HANG_GUARD
    while iteration_of(out) < at_least:
        assert cluster.state(job), f"job {job} ended before iteration {at_least}"
        assert time.monotonic() < deadline, f"job {job} never reached iteration {at_least}"
        time.sleep(0.2)


def job_field(cluster: MultiNodeCluster, job: str, name: str) -> str:
    out = cluster.run("scontrol", "show", "job", job, check=False).stdout
    found = re.search(rf"\b{name}=(\S+)", out)
    return found.group(1) if found else ""


# -- the same total batch on one node ------------------------------------------------------------------
@pytest.fixture(scope="module")
def one_node(tmp_path_factory: pytest.TempPathFactory, tiny_data: Path):
    """``reference(group, backend)``: the output dir of the same 4 ranks on this one machine --
    ``mpirun -np 4`` (mpi backend; Horovod-MPI reduces in the same order, bit-identically) or
    ``torchrun --nproc-per-node 4`` (torch).  Per backend: gloo's ring sums in another order than MPI,
    and after a few steps such last-bit differences flip a proposal in the RPN's top-k (measured:
    identical losses for 2 steps, then 1.814 vs 1.820) -- a different run, not a cross-node error."""
    done: dict[tuple[int, str], Path] = {}

    def reference(group: int, backend: str = "mpi") -> Path:
        if (group, backend) not in done:
            folder = tmp_path_factory.mktemp(f"one_node_{backend}_group{group}")
            cfg = write_config(folder, tiny_data, group=group)
            launcher = {"mpi": "mpirun", "torch": "torchrun"}[backend]
            run(launcher, 4, ["-m", "megdet_hpc.train", "--config", str(cfg)], env={"MEGDET_COMM": backend})
            done[group, backend] = folder / "out"
        return done[group, backend]

    return reference


@pytest.fixture(scope="module")
def uninterrupted(multinode_cluster: MultiNodeCluster, tmp_path_factory: pytest.TempPathFactory, tiny_data):
    """sbatch of the template (srun + PMIx, mpi backend, CGBN over all 4 ranks) across 2 nodes, run
    through: a launch path of its own and the uninterrupted run the fault tests compare with."""
    folder = tmp_path_factory.mktemp("uninterrupted")
    cfg = write_config(folder, tiny_data)
    t0 = time.monotonic()
    proc = sbatch(multinode_cluster, job_script(folder), cfg, MEGDET_COMM="mpi")
    print(f"sbatch srun+pmix mpi backend, 2 nodes x 2 tasks, {ITERS} steps: {time.monotonic() - t0:.1f} s")
    assert proc.returncode == 0, proc.stderr + job_log(folder)[-4000:]
    return folder / "out"


# -- every launch path ------------------------------------------------------------------------------------
def test_sbatch_srun_pmix_mpi_backend_across_two_nodes(uninterrupted: Path, one_node) -> None:
    assert HOSTS_LINE in (uninterrupted / "log.txt").read_text()
    assert "through mpi" in (uninterrupted / "log.txt").read_text()
    assert_matches(uninterrupted, one_node(0))


def test_sbatch_srun_horovod_cgbn_groups_inside_each_node(
    multinode_cluster: MultiNodeCluster, tmp_path: Path, tiny_data: Path, one_node
) -> None:
    """Horovod (MPI controller) started by srun; BN groups of 2 = the tasks of one node."""
    cfg = write_config(tmp_path, tiny_data, group=2)
    proc = sbatch(multinode_cluster, job_script(tmp_path), cfg, MEGDET_COMM="horovod")
    log = (tmp_path / "out" / "log.txt").read_text() if (tmp_path / "out" / "log.txt").exists() else ""
    assert proc.returncode == 0, proc.stderr + job_log(tmp_path)[-4000:]
    assert HOSTS_LINE in log and "hvd.DistributedOptimizer" in log
    assert_matches(tmp_path / "out", one_node(2))
    # Groups of 2 are not the world: the result differs from CGBN over all ranks.
    assert max_difference(final_state(tmp_path / "out")["model"], final_state(one_node(0))["model"]) > 1e-4


def test_srun_torch_distributed_master_address_from_the_node_list(
    multinode_cluster: MultiNodeCluster, tmp_path: Path, tiny_data: Path, one_node
) -> None:
    cfg = write_config(tmp_path, tiny_data)
    proc = sbatch(multinode_cluster, job_script(tmp_path), cfg, MEGDET_COMM="torch")
    assert proc.returncode == 0, proc.stderr + job_log(tmp_path)[-4000:]
    log = (tmp_path / "out" / "log.txt").read_text()
    assert HOSTS_LINE in log and "DistributedDataParallel" in log
    assert_matches(tmp_path / "out", one_node(0, "torch"))


def test_mpirun_inside_the_allocation(
    multinode_cluster: MultiNodeCluster, tmp_path: Path, tiny_data: Path, one_node
) -> None:
    """``--step-launcher mpirun``: mpirun starts its daemons through Slurm; the backend is the default
    (Horovod over MPI); BN groups per node."""
    cfg = write_config(tmp_path, tiny_data, group=2)
    proc = sbatch(
        multinode_cluster,
        job_script(tmp_path, launcher="mpirun"),
        cfg,
        OMPI_ALLOW_RUN_AS_ROOT="1",
        OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1",
    )
    assert proc.returncode == 0, proc.stderr + job_log(tmp_path)[-4000:]
    assert "mpirun -np" in (tmp_path / "job_mpirun.sh").read_text()
    assert HOSTS_LINE in (tmp_path / "out" / "log.txt").read_text()
    assert_matches(tmp_path / "out", one_node(2))


def test_launch_nodes_2_through_submitit(
    multinode_cluster: MultiNodeCluster, tmp_path: Path, tiny_data: Path, one_node
) -> None:
    cfg = write_config(tmp_path, tiny_data)
    args = "--nodes 2 --gpus-per-node 2 --cpus-per-task 1 --time 20 --partition low --wait"
    proc = subprocess.run(
        [sys.executable, "-m", "megdet_hpc.launch", *args.split(), "--folder", str(tmp_path / "sub")]
        + ["--config", str(cfg)],
        cwd=REPO,
        capture_output=True,
        text=True,
        env=multinode_cluster.env(),
        timeout=HANG_GUARD,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "world size 4 x 1 image(s) = total batch 4" in proc.stdout and "4 task(s) succeeded" in proc.stdout
    assert HOSTS_LINE in (tmp_path / "out" / "log.txt").read_text()
    assert_matches(tmp_path / "out", one_node(0))


def test_gpus_per_task_gives_each_task_its_own_device(multinode_cluster: MultiNodeCluster) -> None:
    """``--gpus-per-task=1``: every task sees one GPU, as device 0 (local rank -> GPU is Slurm's job)."""
    out = multinode_cluster.run(
        "srun", "-N2", "--ntasks-per-node=2", "--gpus-per-task=1", "-l",
        "bash", "-c", "echo $(hostname) $SLURM_LOCALID $CUDA_VISIBLE_DEVICES",
        timeout=120,
    ).stdout  # fmt: skip
    rows = [line.split(": ", 1)[1].split() for line in out.strip().splitlines()]
    assert len(rows) == 4 and all(len(r) == 3 for r in rows), out
    per_host: dict[str, set[tuple[str, str]]] = {}
    for host, local, gpu in rows:
        per_host.setdefault(host, set()).add((local, gpu))
    # Two hosts; on each, local ranks 0 and 1 hold two different GPUs of the node.
    assert len(per_host) == 2 and all(len({g for _, g in v}) == 2 for v in per_host.values()), out
    assert all({loc for loc, _ in v} == {"0", "1"} for v in per_host.values()), out


# -- failures between hosts -----------------------------------------------------------------------------
def test_preemption_across_two_nodes_checkpoints_once_and_resumes_bit_equal(
    multinode_cluster: MultiNodeCluster, tmp_path: Path, tiny_data: Path, uninterrupted: Path
) -> None:
    cluster = multinode_cluster
    cfg = write_config(tmp_path, tiny_data, checkpoint_period=0)
    out = tmp_path / "out"
    sub = sbatch(cluster, job_script(tmp_path), cfg, wait=False, MEGDET_COMM="mpi")
    assert sub.returncode == 0, sub.stderr
    job = sub.stdout.strip().split(";")[0]
    wait_iteration(out, 2, cluster, job)
    # The high partition wants both nodes of the job, whole: Slurm preempts (signal, grace) and requeues.
    cluster.run("sbatch", "-p", "high", "-N2", "-w", "node1,node2", "--exclusive", "-o", "/dev/null",
                "--wrap", "sleep 1")  # fmt: skip
    cluster.wait_gone(job, HANG_GUARD)
    log = job_log(tmp_path)
    assert "restart 1" in log and log.count("stopped by") == 1, log[-4000:]
    assert "resumed from" in (out / "log.txt").read_text()
    assert_matches(out, uninterrupted, exact=True)
    assert final_state(out)["sampler"] == final_state(uninterrupted)["sampler"]


def test_frozen_rank_every_reachable_rank_names_the_collective_and_the_job_ends(
    multinode_cluster: MultiNodeCluster, tmp_path: Path, tiny_data: Path
) -> None:
    """SIGSTOP one rank on node2 (mpi backend): its peers block in an MPI collective forever without
    the watchdog.  With it, each of the other 3 prints one line and the job ends with code 5."""
    cluster = multinode_cluster
    cfg = write_config(tmp_path, tiny_data, stall_timeout_s=STALL_S)
    out = tmp_path / "out"
    sub = sbatch(cluster, job_script(tmp_path), cfg, wait=False, MEGDET_COMM="mpi")
    job = sub.stdout.strip().split(";")[0]
    wait_iteration(out, 3, cluster, job)
    before = assert_checkpoints_intact(out)
    pids = cluster.node_pids(2)
    assert len(pids) == 2, pids
    frozen_pid = pids[-1]
    environ = Path(f"/proc/{frozen_pid}/environ").read_bytes().split(b"\0")
    frozen = int(next(v for v in environ if v.startswith(b"SLURM_PROCID=")).split(b"=")[1])
    os.kill(frozen_pid, signal.SIGSTOP)
    ended = cluster.wait_gone(job, HANG_GUARD)
    print(f"frozen rank: job ended {ended:.1f} s after SIGSTOP (stall timeout {STALL_S} s)")
    assert job_field(cluster, job, "ExitCode") == "5:0" and job_field(cluster, job, "JobState") == "FAILED"
    marker = "megdet_hpc.train: error: stalled:"
    lines = [line[line.index(marker) :] for line in job_log(tmp_path).splitlines() if marker in line]
    ranks = [int(re.search(r"rank (\d) of 4 on node[12] ", line).group(1)) for line in lines]
    assert len(ranks) == len(set(ranks)), lines  # one line per rank
    # Every rank but the frozen one; that one may add its own once Slurm's SIGCONT + SIGTERM thaws it.
    assert set(ranks) - {frozen} == {0, 1, 2, 3} - {frozen}, (frozen, lines)
    for rank, line in zip(ranks, lines):
        assert "exiting with code 5" in line, line
        if rank != frozen:  # (the frozen one says where it was: mid-computation, as a rule)
            assert re.search(r"on node[12] waits in (allreduce|broadcast|barrier)", line), line
    after = assert_checkpoints_intact(out)
    assert {k: v for k, v in after.items() if k in before} == before


def test_unreachable_node_link_down_job_ends_and_is_requeued(
    multinode_cluster: MultiNodeCluster, tmp_path: Path, tiny_data: Path
) -> None:
    """node2's link down mid-training (torch backend, TCP): the ranks on node1 report the collective
    they wait in; Slurm declares node2 down (SlurmdTimeout) and requeues the job."""
    cluster = multinode_cluster
    # The watchdog must speak before Slurm declares node2 down (SlurmdTimeout 30 s) and the requeued
    # run truncates the job log: a timeout well below it (steps take ~1 s here; the first counts double).
    cfg = write_config(tmp_path, tiny_data, stall_timeout_s=LINK_STALL_S)
    out = tmp_path / "out"
    sub = sbatch(cluster, job_script(tmp_path), cfg, wait=False, MEGDET_COMM="torch")
    job = sub.stdout.strip().split(";")[0]
    wait_iteration(out, 3, cluster, job)
    before = assert_checkpoints_intact(out)
    cluster.node(2, "link-down")
    t0 = time.monotonic()
    seen: set[str] = set()  # stall lines, collected while they are in the log
    try:
        deadline = t0 + HANG_GUARD
        while job_field(cluster, job, "Restarts") in ("", "0"):
            assert time.monotonic() < deadline, "the job never ended"
            seen |= {line for line in job_log(tmp_path).splitlines() if "error: stalled:" in line}
            time.sleep(0.5)
        print(f"link down: job ended (requeued) {time.monotonic() - t0:.1f} s after the link went down")
        lines = sorted(seen)
        node1 = {
            m.group(1)
            for m in re.finditer(
                r"rank (\d) of 4 on node1 waits in (?:allreduce|broadcast|barrier|allgather_object)",
                "\n".join(lines),
            )
        }
        assert node1 == {"0", "1"}, lines
        cluster.run("scancel", job)
        cluster.wait_gone(job, HANG_GUARD)
    finally:
        cluster.resume_node(2)
    after = assert_checkpoints_intact(out)
    assert {k: v for k, v in after.items() if k in before} == before


def test_lost_node_job_ends_checkpoint_intact_requeued_resumes_elsewhere(
    multinode_cluster: MultiNodeCluster, tmp_path: Path, tiny_data: Path, uninterrupted: Path
) -> None:
    """node2's slurmd and tasks killed: the job ends (node failure), its checkpoint is intact, Slurm
    requeues it, and it resumes on the nodes it gets (node1 + node3) and ends like the uninterrupted run."""
    cluster = multinode_cluster
    cfg = write_config(tmp_path, tiny_data, stall_timeout_s=STALL_S)
    out = tmp_path / "out"
    sub = sbatch(cluster, job_script(tmp_path), cfg, wait=False, MEGDET_COMM="mpi")
    job = sub.stdout.strip().split(";")[0]
    try:
        wait_iteration(out, 3, cluster, job)
        cluster.node(2, "kill")
        t0 = time.monotonic()
        deadline = t0 + HANG_GUARD
        while job_field(cluster, job, "Restarts") in ("", "0"):
            assert time.monotonic() < deadline, "the job never ended"
            time.sleep(0.5)
        print(f"lost node: job ended (requeued) {time.monotonic() - t0:.1f} s after node2 was killed")
        assert_checkpoints_intact(out)
        cluster.wait_gone(job, HANG_GUARD)
    finally:
        cluster.resume_node(2)
    log = (out / "log.txt").read_text()
    placements = re.findall(r"4 rank\(s\) on 2 host\(s\): (node\d+): 0,1; (node\d+): 2,3", log)
    assert placements[0] == ("node1", "node2") and len(placements) == 2, log[-3000:]
    assert "node2" not in placements[1], placements  # resumed on the nodes it got, not the lost one
    assert "resumed from" in log, log[-3000:]
    assert_matches(out, uninterrupted, exact=True)


# -- the committed scripts on a cluster their size ------------------------------------------------------
def test_committed_scripts_are_accepted_by_a_cluster_their_size(
    multinode_cluster: MultiNodeCluster, tmp_path: Path
) -> None:
    for gpus in (1, 8, 16, 32, 64, 128):
        proc = subprocess.run(
            ["sbatch", "--test-only", str(REPO / "slurm" / f"train_{gpus}gpu.sh")],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            env=multinode_cluster.env(),
            timeout=60,
        )
        assert proc.returncode == 0 and "to start at" in proc.stderr, (gpus, proc.stderr)
        nodes = max(1, gpus // 8)
        assert "processors on nodes node" in proc.stderr and str(gpus * 8) in proc.stderr, proc.stderr
        if nodes == 16:
            assert "node[1-16]" in proc.stderr, proc.stderr
    assert not list(tmp_path.iterdir())  # nothing prepared, nothing written
