"""Signals to the launcher (not the ranks) and a dead peer, through the real launchers.

``python -m megdet_hpc.launch local`` is the launcher path these tests drive: a stop signal sent to
it (what a Ctrl-C or a batch system's kill does) must end in a checkpoint and exit code 3 under
every launcher, and a rank killed under torchrun must leave one line naming it and exit code 5 --
where the bare launchers say 1 (see ``megdet_hpc/launch/relay.py`` for what each does by itself).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from launchers import REPO
from test_faults import HANG_GUARD, finish, iteration_of, wait_for


def launch_local(cfg: Path, launcher: str, nproc: int = 2) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    return subprocess.Popen(
        [sys.executable, "-m", "megdet_hpc.launch", "local", "--launcher", launcher, "-np", str(nproc)]
        + ["--config", str(cfg)],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _long_run(tiny_config):  # type: ignore[no-untyped-def]
    return tiny_config(
        data={"images_per_gpu": 1},
        solver={"max_iter": 100000},
        train={"checkpoint_period": 0, "eval_at_end": False},
    )


def _no_frames_of_ours(stderr: str) -> bool:
    """No traceback of this package (a launcher's own report may still quote one of its frames)."""
    return not [
        line for line in stderr.splitlines() if line.strip().startswith("File ") and "megdet_hpc" in line
    ]


# Each launcher once, and between them every kind of signal: the relay turns SIGTERM, SIGINT and SIGHUP
# alike into SIGTERM to the ranks and passes SIGUSR1/2 as they are (launch/relay.py).
CASES = [
    ("mpirun", signal.SIGINT),
    ("torchrun", signal.SIGHUP),
    ("hvd-gloo", signal.SIGTERM),
    ("hvd-mpi", signal.SIGUSR2),
]


@pytest.mark.parametrize(("launcher", "sig"), CASES, ids=[f"{lau}-{s.name}" for lau, s in CASES])
def test_a_signal_to_the_launcher_checkpoints_and_exits_3(
    tiny_config, tmp_path: Path, launcher: str, sig: signal.Signals
) -> None:
    cfg = _long_run(tiny_config)
    out = tmp_path / "out"
    proc = launch_local(cfg, launcher)
    wait_for(lambda: iteration_of(out) >= 2, proc)
    proc.send_signal(sig)
    code, stdout, stderr = finish(proc)
    assert code == 3, (stdout[-2000:], stderr[-3000:])
    stopped = [
        line
        for line in stdout.splitlines()
        if "stopped by SIGTERM" in line or f"stopped by {sig.name}" in line
    ]
    assert stopped, stdout[-2000:]
    iteration = int(stopped[0].split("at iteration ")[1].split(":")[0])
    assert (out / "last_checkpoint").read_text().strip() == f"model_{iteration:07d}.pth"
    assert iteration_of(out) == iteration  # the checkpoint is the last step trained
    assert _no_frames_of_ours(stderr), stderr[-3000:]
    assert not [p for p in psutil.process_iter(["cmdline"]) if str(cfg) in " ".join(p.info["cmdline"] or [])]


def test_a_dead_peer_under_torchrun_is_one_line_naming_it(tiny_config, tmp_path: Path) -> None:
    cfg = _long_run(tiny_config)
    out = tmp_path / "out"
    proc = launch_local(cfg, "torchrun")
    wait_for(lambda: iteration_of(out) >= 2, proc)
    ranks = [
        p
        for p in psutil.Process(proc.pid).children(recursive=True)
        if "megdet_hpc.train" in " ".join(p.cmdline()) and p.environ().get("RANK") == "1"
    ]
    victim = min(ranks, key=lambda p: p.create_time())  # the rank, not its DataLoader worker
    victim.send_signal(signal.SIGKILL)
    t0 = time.monotonic()
    code, stdout, stderr = finish(proc)
    assert time.monotonic() - t0 < HANG_GUARD
    assert code == 5, (stdout[-2000:], stderr[-3000:])
    lines = [line for line in stderr.splitlines() if "megdet_hpc.train: error:" in line]
    assert len(lines) == 1 and "lost a peer: rank 1 (on " in lines[0] and "no longer running" in lines[0], (
        lines
    )
    assert "exitcode  : 5" in stderr  # torchrun's own report carries rank 0's code
    assert _no_frames_of_ours(stderr), stderr[-3000:]
    assert "Connection reset by peer" not in stderr
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows and rows[-1]["iteration"] >= 2  # what was written stays


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGHUP], ids=["SIGINT-to-the-group", "SIGHUP"])
def test_ctrl_c_or_hangup_checkpoints_and_exits_3(tiny_config, tmp_path: Path, sig: signal.Signals) -> None:
    """A terminal's Ctrl-C reaches the whole process group (the DataLoader worker too); a closed
    terminal sends SIGHUP.  Before: an 80-line KeyboardInterrupt traceback / killed, no checkpoint."""
    cfg = tiny_config(
        data={"num_workers": 1},
        solver={"max_iter": 100000},
        train={"checkpoint_period": 0, "eval_at_end": False},
    )
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "megdet_hpc.train", "--config", str(cfg)],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own process group, as a terminal's foreground job
    )
    wait_for(lambda: iteration_of(out) >= 2, proc)
    if sig == signal.SIGINT:
        os.killpg(proc.pid, sig)
    else:
        proc.send_signal(sig)
    code, stdout, stderr = finish(proc)
    assert code == 3, (stdout[-2000:], stderr[-3000:])
    assert "Traceback" not in stdout + stderr
    stopped = [line for line in stdout.splitlines() if f"stopped by {sig.name} at iteration" in line]
    assert stopped, stdout[-2000:]
    iteration = int(stopped[0].split("at iteration ")[1].split(":")[0])
    assert (out / "last_checkpoint").read_text().strip() == f"model_{iteration:07d}.pth"
