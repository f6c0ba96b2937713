"""``scripts/slurm_cluster.sh --nodes``: nodes really apart, and ``stop`` leaves nothing behind.

A small cluster of its own (2 nodes, its own DIR, so its own bridge and ports), beside the session's
16-node one.  "Nothing behind": no namespace, link or bridge of its network id, no process naming its
slurm.conf, no state file -- after a clean start, after a start over a half-stopped cluster, and after a
start that failed midway (a slurmd that will not start).
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "slurm_cluster.sh"

pytestmark = pytest.mark.slurm


def cluster(
    *args: str, env: dict[str, str] | None = None, check: bool = True
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(SCRIPT), *args], capture_output=True, text=True, env=env, check=check, timeout=120
    )


def net_id(folder: Path) -> str:
    return dict(line.split("=", 1) for line in (folder / "cluster.env").read_text().split())["NET_ID"]


def leftovers(folder: Path, nid: str) -> list[str]:
    found = [ns for ns in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split()
             if ns.startswith(f"md{nid}-")]  # fmt: skip
    links = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True).stdout
    found += [
        line.split(": ")[1] for line in links.splitlines() if line.split(": ")[1].startswith(f"md{nid}")
    ]
    conf = str(folder / "slurm.conf").encode()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if conf in Path(f"/proc/{pid}/cmdline").read_bytes():
                found.append(f"process {pid}")
        except OSError:
            continue
    if (folder / "cluster.env").exists():
        found.append("cluster.env")
    return found


def slurm(folder: Path, *command: str) -> str:
    env = {**os.environ, "SLURM_CONF": str(folder / "slurm.conf")}
    return subprocess.run(
        list(command), capture_output=True, text=True, env=env, check=True, timeout=60
    ).stdout


def test_nodes_are_apart_and_stop_leaves_nothing_even_after_a_half_stop(tmp_path: Path) -> None:
    folder = tmp_path / "c"
    cluster("start", str(folder), "--nodes", "2", "--gpus-per-node", "2", "--cpus-per-node", "2")
    nid = net_id(folder)
    try:
        nodes = sorted(set(slurm(folder, "sinfo", "-h", "-N", "-o", "%N %T %c %G").splitlines()))
        assert nodes == ["node1 idle 2 gpu:2", "node2 idle 2 gpu:2"], nodes
        # Own hostname, own /dev/shm: a file made on node1 is not on node2 nor here.
        made = slurm(folder, "srun", "-w", "node1", "bash", "-c", "hostname; touch /dev/shm/megdet-probe")
        assert made.strip() == "node1"
        seen = slurm(folder, "srun", "-w", "node2", "bash", "-c", "hostname; ls /dev/shm")
        assert seen.split()[0] == "node2" and "megdet-probe" not in seen
        assert not Path("/dev/shm/megdet-probe").exists()
        # Half-stopped: the controller killed and one node's namespace gone; a start over it works.
        os.kill(int((folder / "slurmctld.pid").read_text()), 9)
        subprocess.run(["ip", "netns", "del", f"md{nid}-node2"], check=True)
        cluster("start", str(folder), "--nodes", "2", "--gpus-per-node", "2", "--cpus-per-node", "2")
        assert len(set(slurm(folder, "sinfo", "-h", "-N", "-o", "%N %T").splitlines())) == 2
    finally:
        cluster("stop", str(folder), check=False)
    assert leftovers(folder, nid) == []


def test_a_failed_start_leaves_nothing(tmp_path: Path) -> None:
    """slurmd that will not start (a real failure midway: bridge, namespaces and slurmctld exist)."""
    bad = tmp_path / "bin"
    bad.mkdir()
    (bad / "slurmd").write_text("#!/bin/sh\necho 'slurmd: cannot start' >&2\nexit 1\n")
    (bad / "slurmd").chmod(0o755)
    folder = tmp_path / "c"
    env = {**os.environ, "PATH": f"{bad}{os.pathsep}{os.environ['PATH']}"}
    proc = cluster("start", str(folder), "--nodes", "2", env=env, check=False)
    assert proc.returncode != 0 and "start failed; cleaning up md" in proc.stderr, proc.stderr
    assert "slurmd: cannot start" in proc.stderr  # it got as far as starting the nodes' daemons
    nid = proc.stderr.split("start failed; cleaning up md", 1)[1].split("-", 1)[0]
    assert nid.isdigit(), proc.stderr
    assert leftovers(folder, nid) == []
