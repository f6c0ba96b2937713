"""Checkpoint-restart end to end: bit-exact resume, signals, world-size changes, dead ranks."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import psutil
import torch
from launchers import REPO, command, run

from megdet_hpc.launch.local import local_env

TRAIN = ["-m", "megdet_hpc.train"]
FIXED = {
    "solver": {"warmup_iters": 5, "max_iter": 8, "steps": [6]},
    "train": {"checkpoint_period": 0, "eval_at_end": False},
}


def final_state(out: Path, iteration: int) -> dict:
    return torch.load(out / f"model_{iteration:07d}.pth", weights_only=True)


def assert_bitwise_equal(a: dict, b: dict) -> None:
    for key in ("model",):
        for name, tensor in a[key].items():
            assert torch.equal(tensor, b[key][name]), f"{key}.{name} differs"
    sa, sb = a["optimizer"]["state"], b["optimizer"]["state"]
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k]["momentum_buffer"], sb[k]["momentum_buffer"]), f"momentum {k}"
    assert a["sampler"] == b["sampler"] and a["images_seen"] == b["images_seen"]


def test_interrupted_runs_end_bitwise_identical(tiny_config, tmp_path: Path) -> None:
    """2 ranks under horovodrun; stopped during warmup (it 3) and resumed: the rest crosses the end of
    warmup and the LR step (it 6) from restored state."""
    cfg = tiny_config(data={"images_per_gpu": 1, "num_workers": 1}, **FIXED)  # workers must not hang exit
    ref, cut = tmp_path / "ref", tmp_path / "cut"
    run("hvd-gloo", 2, [*TRAIN, "--config", str(cfg), f"train.output_dir={ref}"])
    for stop in (3, 8):
        run(
            "hvd-gloo",
            2,
            [*TRAIN, "--config", str(cfg), f"train.output_dir={cut}", f"solver.max_iter={stop}"],
        )
    assert sorted(p.name for p in cut.glob("model_*.pth"))[-1] == "model_0000008.pth"
    assert_bitwise_equal(final_state(ref, 8), final_state(cut, 8))
    lines = [json.loads(x) for x in (cut / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in lines if "loss" in r] == list(range(1, 9))  # history kept, no replay


def _wait_for_iteration(out: Path, iteration: int, proc: subprocess.Popen, timeout: float = 180) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        metrics = out / "metrics.jsonl"
        if metrics.exists() and any(
            json.loads(x).get("iteration", 0) >= iteration for x in metrics.read_text().splitlines()
        ):
            return
        if proc.poll() is not None:
            raise AssertionError(f"training exited early: {proc.returncode}\n{proc.stderr.read()[-2000:]}")
        time.sleep(0.1)
    raise AssertionError("training did not reach the iteration in time")


def _workers(proc: subprocess.Popen) -> list[psutil.Process]:
    kids = psutil.Process(proc.pid).children(recursive=True)
    # horovodrun wraps each rank in `sh -c`: keep the Python processes themselves.
    return [k for k in kids if k.name().startswith("python") and "megdet_hpc.train" in " ".join(k.cmdline())]


def _start(launcher: str, cfg: Path, out: Path, *extra: str) -> subprocess.Popen:
    env = local_env(launcher, pythonpath=str(REPO))
    argv = [*TRAIN, "--config", str(cfg), f"train.output_dir={out}", *extra]
    return subprocess.Popen(
        command(launcher, 2, argv),
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_sigusr1_checkpoints_exits_and_resumes_identically(tiny_config, tmp_path: Path) -> None:
    cfg = tiny_config(
        data={"images_per_gpu": 1, "num_workers": 1},
        solver={"max_iter": 14, "warmup_iters": 5, "steps": [10]},
        train={"checkpoint_period": 0, "eval_at_end": False},
    )
    ref, cut = tmp_path / "ref", tmp_path / "cut"
    proc = _start("hvd-gloo", cfg, cut)
    _wait_for_iteration(cut, 3, proc)
    workers = _workers(proc)
    assert len(workers) == 2
    # One rank only (the per-step vote stops both), and its DataLoader worker too, as Slurm signals
    # every process of a step: the worker must survive it.
    loader_workers = workers[-1].children()
    assert loader_workers
    for p in [workers[-1], *loader_workers]:
        p.send_signal(signal.SIGUSR1)
    proc.wait(timeout=120)
    out, err = proc.communicate()
    assert proc.returncode != 0  # horovodrun reports the workers' exit code 3 as a failure
    assert "stopped by" in out
    stopped_at = int((cut / "last_checkpoint").read_text().strip()[6:13])
    assert 3 <= stopped_at < 14
    run("hvd-gloo", 2, [*TRAIN, "--config", str(cfg), f"train.output_dir={cut}"])
    run("hvd-gloo", 2, [*TRAIN, "--config", str(cfg), f"train.output_dir={ref}"])
    assert_bitwise_equal(final_state(ref, 14), final_state(cut, 14))


def test_resume_on_another_world_size(tiny_config, tmp_path: Path) -> None:
    """2 -> 1 ranks keeps the total batch (accumulation) and the exact image stream; 1 -> 2 too."""
    cfg = tiny_config(data={"images_per_gpu": 1}, **FIXED)
    ref, down = tmp_path / "ref", tmp_path / "down"
    run("mpirun", 2, [*TRAIN, "--config", str(cfg), f"train.output_dir={ref}"])
    run("mpirun", 2, [*TRAIN, "--config", str(cfg), f"train.output_dir={down}", "solver.max_iter=3"])
    proc = run("single", 1, [*TRAIN, "--config", str(cfg), f"train.output_dir={down}"])
    assert "keeping the total batch 2 with grad_accum 2" in proc.stdout
    a, b = final_state(ref, 8), final_state(down, 8)
    assert a["sampler"] == b["sampler"] and a["images_seen"] == b["images_seen"] == 16
    assert b["world_size"] == 1 and b["grad_accum"] == 2
    # The LR curve continues from images seen (weights differ: BN now normalises 1 image per forward).
    assert lr(down) == lr(ref)
    assert all(torch.isfinite(v).all() for v in b["model"].values() if v.is_floating_point())

    up = tmp_path / "up"
    cfg2 = tiny_config("two.yaml", data={"images_per_gpu": 2}, **FIXED)
    run("single", 1, [*TRAIN, "--config", str(cfg2), f"train.output_dir={up}", "solver.max_iter=3"])
    proc = run("mpirun", 2, [*TRAIN, "--config", str(cfg2), f"train.output_dir={up}"])
    assert "keeping the total batch 2 with images_per_gpu 1" in proc.stdout
    c = final_state(up, 8)
    assert c["sampler"] == a["sampler"] and c["world_size"] == 2 and c["images_per_gpu"] == 1
    assert lr(up) == lr(ref)


def lr(out: Path) -> dict[int, float]:
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["iteration"]: r["lr"] for r in rows if "lr" in r}


def test_killed_rank_ends_the_job_quickly(tiny_config, tmp_path: Path) -> None:
    cfg = tiny_config(
        data={"images_per_gpu": 1},
        solver={"max_iter": 100000},
        train={"checkpoint_period": 0, "eval_at_end": False},
    )
    for launcher in ("hvd-gloo", "mpirun"):
        out = tmp_path / launcher
        proc = _start(launcher, cfg, out)
        _wait_for_iteration(out, 2, proc)
        victim = _workers(proc)[-1]
        victim.send_signal(signal.SIGKILL)
        t0 = time.time()
        try:
            proc.wait(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
        elapsed = time.time() - t0
        stdout, stderr = proc.communicate()
        assert proc.returncode != 0 and elapsed < 60, (launcher, elapsed)
        text = stdout + stderr
        assert (
            ("Process name: 1" in text or "Process name: 0" in text)
            if launcher == "hvd-gloo"
            else ("exited on signal 9" in text)
        ), text[-2000:]


def test_no_resume_and_resume_from(tiny_config, tmp_path: Path) -> None:
    cfg = tiny_config(solver={"max_iter": 2}, train={"checkpoint_period": 1, "eval_at_end": False})
    out = tmp_path / "out"
    run("single", 1, [*TRAIN, "--config", str(cfg)])
    first = (out / "model_0000002.pth").read_bytes()
    # --no-resume: a fresh run; the earlier one is archived, not deleted or overwritten.
    proc = run("single", 1, [*TRAIN, "--config", str(cfg), "--no-resume"])
    assert "moved the previous run" in proc.stdout
    archived = list((out / "archive").glob("*/model_0000002.pth"))
    assert len(archived) == 1 and archived[0].read_bytes() == first
    # --resume-from an explicit file continues from it.
    proc = run(
        "single", 1, [*TRAIN, "--config", str(cfg), "--resume-from", str(archived[0]), "solver.max_iter=3"]
    )
    assert "resumed from" in proc.stdout and (out / "model_0000003.pth").exists()
    # A garbage --resume-from is a one-line error and changes nothing.
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"\x80\x04garbage")
    before = sorted(p.name for p in out.iterdir())
    bad = run("single", 1, [*TRAIN, "--config", str(cfg), "--resume-from", str(junk)], check=False)
    assert bad.returncode == 2 and "junk.pth: cannot be loaded" in bad.stderr.strip().splitlines()[-1]
    assert sorted(p.name for p in out.iterdir()) == before
    # Corrupt newest checkpoint: warn and fall back to the previous valid one.
    newest = out / "model_0000003.pth"
    newest.write_bytes(newest.read_bytes()[:100])
    proc = run("single", 1, [*TRAIN, "--config", str(cfg), "solver.max_iter=3"])
    assert "skipping checkpoint: model_0000003.pth" in proc.stdout + proc.stderr
    assert "resumed from" in proc.stdout and "model_0000002.pth" in proc.stdout


def test_time_based_checkpoints(tiny_config, tmp_path: Path) -> None:
    """train.checkpoint_minutes: rank 0's clock raises a flag in the per-step vote (no extra collective)."""
    cfg = tiny_config(
        data={"images_per_gpu": 1},
        solver={"max_iter": 5},
        train={
            "checkpoint_period": 0,
            "checkpoint_minutes": 1e-6,
            "keep_checkpoints": 10,
            "eval_at_end": False,
        },
    )
    run("mpirun", 2, [*TRAIN, "--config", str(cfg)])
    names = sorted(p.name for p in (tmp_path / "out").glob("model_*.pth"))
    assert names == [f"model_{i:07d}.pth" for i in range(1, 6)]
