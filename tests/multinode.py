"""A real multi-node Slurm cluster on this machine for the tests (``scripts/slurm_cluster.sh --nodes``).

One start per test session (the ``multinode_cluster`` fixture): 16 nodes, each in its own network, UTS
and mount namespace with 8 fake GPUs and 64 declared CPUs -- the size the committed 128-GPU script
asks for -- while the training tests use two of them (2 tasks each, tiny images).  The one-node
cluster of ``slurm_cluster`` may run beside it (other ports); this one never touches the process
environment: every command gets ``SLURM_CONF`` through ``env``.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "scripts" / "slurm_cluster.sh"
NODES, GPUS_PER_NODE, CPUS_PER_NODE = 16, 8, 64


@dataclass
class MultiNodeCluster:
    folder: Path

    @property
    def conf(self) -> Path:
        return self.folder / "slurm.conf"

    def env(self, **extra: str) -> dict[str, str]:
        """The environment of a job submitted from the test: this cluster, this venv, one thread."""
        env = dict(os.environ)
        env.update(
            SLURM_CONF=str(self.conf),
            MEGDET_PYTHON=sys.executable,
            OMP_NUM_THREADS="1",
            PATH=f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}",
        )
        env.pop("MEGDET_COMM", None)
        env.update(extra)
        return env

    def run(self, *command: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            list(command), capture_output=True, text=True, env=self.env(), check=check, timeout=timeout
        )

    def node(self, k: int, action: str) -> subprocess.CompletedProcess[str]:
        """``slurm_cluster.sh node DIR k action``: kill, start, link-down, link-up."""
        return subprocess.run(
            ["bash", str(SCRIPT), "node", str(self.folder), str(k), action],
            capture_output=True,
            text=True,
            check=True,
            timeout=60,
        )

    def node_pids(self, k: int, needle: str = "megdet_hpc.train") -> list[int]:
        """Processes living on node ``k`` (its network namespace) whose command line contains ``needle``."""
        ns = f"md{self.net_id}-node{k}"
        out = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True, check=True).stdout
        pids = []
        for pid in out.split():
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            if needle in cmdline and "srun" not in cmdline.split(" ", 1)[0]:
                pids.append(int(pid))
        return pids

    @property
    def net_id(self) -> str:
        for line in (self.folder / "cluster.env").read_text().splitlines():
            if line.startswith("NET_ID="):
                return line.split("=", 1)[1]
        raise RuntimeError("cluster.env has no NET_ID")

    def state(self, job: str) -> str:
        out = self.run("squeue", "-h", "-j", job, "-o", "%T", check=False)
        return out.stdout.strip()

    def wait_gone(self, job: str, timeout: float) -> float:
        """Seconds until ``job`` left the queue (fails past ``timeout``: a hang guard)."""
        t0 = time.monotonic()
        while self.state(job):
            assert time.monotonic() - t0 < timeout, f"job {job} still {self.state(job)} after {timeout} s"
            time.sleep(0.5)
        return time.monotonic() - t0

    def resume_node(self, k: int) -> None:
        """Bring node ``k`` back after a fault: link up, a fresh slurmd (what a rebooted node does; a
        DOWN node's old slurmd is pinged again only after minutes), state resumed, idle."""
        self.node(k, "link-up")
        self.node(k, "kill")
        self.node(k, "start")
        self.run("scontrol", "update", f"nodename=node{k}", "state=resume", check=False)
        deadline = time.monotonic() + 60
        while self.run("sinfo", "-h", "-n", f"node{k}", "-o", "%T", check=False).stdout.split()[:1] != [
            "idle"
        ]:
            assert time.monotonic() < deadline, f"node{k} did not come back"
            time.sleep(0.5)


def start(folder: Path) -> MultiNodeCluster:
    t0 = time.monotonic()
    subprocess.run(
        [
            "bash",
            str(SCRIPT),
            "start",
            str(folder),
            "--nodes",
            str(NODES),
            "--gpus-per-node",
            str(GPUS_PER_NODE),
            "--cpus-per-node",
            str(CPUS_PER_NODE),
        ],
        check=True,
        capture_output=True,
        timeout=120,
    )
    print(f"multi-node cluster ({NODES} nodes) up in {time.monotonic() - t0:.1f} s")
    return MultiNodeCluster(folder)


def stop(cluster: MultiNodeCluster) -> None:
    t0 = time.monotonic()
    subprocess.run(["bash", str(SCRIPT), "stop", str(cluster.folder)], capture_output=True, timeout=120)
    print(f"multi-node cluster stopped in {time.monotonic() - t0:.1f} s")
