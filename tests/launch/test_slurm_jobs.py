"""Real jobs on the local Slurm cluster: sbatch, the submitit launcher, and preemption + requeue."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from megdet_hpc.launch.resources import SlurmResources
from megdet_hpc.launch.sbatch import SlurmJob, render

REPO = Path(__file__).resolve().parents[2]


def job_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        MEGDET_PYTHON=sys.executable,
        OMP_NUM_THREADS="1",
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}",
        **extra,
    )
    env.pop("MEGDET_COMM", None)
    return env


def cpu_script(tmp_path: Path, name: str = "job.sh", job_name: str = "", **kw) -> Path:
    resources = SlurmResources.for_gpus(
        2, 0, cpus_per_task=1, time="00:15:00", partition="low", signal_lead_s=60, job_name=job_name
    )
    path = tmp_path / name
    job = SlurmJob(resources, **{"images_per_gpu": 1, **kw})
    path.write_text(render(job))  # no logs/ folder needed: the log goes to the submit dir
    return path


SUBMITIT_JOB = "megdet-submitit-test"


def submitit_command(tmp_path: Path, cfg: Path, timeout_min: int) -> list[str]:
    """``python -m megdet_hpc.launch`` for a 1-node, 2-CPU-task job on the test cluster, followed to its end."""
    args = (
        f"--nodes 1 --gpus-per-node 0 --tasks-per-node 2 --cpus-per-task 1 --time {timeout_min} --partition low "
        f"--job-name {SUBMITIT_JOB}"
    )
    return [
        sys.executable,
        "-m",
        "megdet_hpc.launch",
        *args.split(),
        "--folder",
        str(tmp_path / "sub"),
        "--config",
        str(cfg),
        "--wait",
    ]


def squeue_state(job_id: str) -> str:
    out = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%T"], capture_output=True, text=True)
    return out.stdout.strip()


def wait_gone(job_id: str, timeout: float) -> None:
    deadline = time.time() + timeout
    while squeue_state(job_id) and time.time() < deadline:
        time.sleep(1)
    assert not squeue_state(job_id), f"job {job_id} still {squeue_state(job_id)}"


def test_sbatch_cpu_script_trains_and_checkpoints(slurm_cluster: Path, tiny_config, tmp_path: Path) -> None:
    """1 node, 2 tasks, a job name and output dir full of shell metacharacters."""
    marker = tmp_path / "pwned"  # `touch pwned` would create it in the job's working directory
    out = tmp_path / "out dir $(touch pwned) `touch pwned`"
    script = cpu_script(tmp_path, job_name="megdet 'test' $(touch pwned)", output_dir=str(out))
    cfg = tiny_config(train={"checkpoint_period": 1, "eval_at_end": False}, solver={"max_iter": 3})
    proc = subprocess.run(
        ["sbatch", "--wait", str(script)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env=job_env(MEGDET_CONFIG=str(cfg)),
        timeout=300,
    )
    logs = "\n".join(p.read_text(errors="replace") for p in tmp_path.glob("*.out"))
    assert proc.returncode == 0, proc.stderr + logs[-3000:]
    assert (out / "last_checkpoint").read_text().strip() == "model_0000003.pth"
    state = torch.load(out / "model_0000003.pth", weights_only=True)
    assert state["world_size"] == 2
    assert not marker.exists()


def test_submitit_launcher_runs_to_completion(slurm_cluster: Path, tiny_config, tmp_path: Path) -> None:
    cfg = tiny_config(
        data={"images_per_gpu": 1},
        solver={"max_iter": 3},
        train={"checkpoint_period": 0, "eval_at_end": False},
    )
    proc = subprocess.run(
        submitit_command(tmp_path, cfg, timeout_min=20),
        cwd=REPO,
        capture_output=True,
        text=True,
        env=job_env(),
        timeout=400,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "submitted job" in proc.stdout and "2 task(s) succeeded" in proc.stdout
    state = torch.load(tmp_path / "out/model_0000003.pth", weights_only=True)
    assert state["world_size"] == 2 and state["iteration"] == 3


def test_launcher_dry_run_and_bad_input(tiny_config, tmp_path: Path) -> None:
    cfg = tiny_config()
    dry = subprocess.run(
        [
            sys.executable,
            "-m",
            "megdet_hpc.launch",
            "--nodes",
            "2",
            "--gpus-per-node",
            "8",
            "--config",
            str(cfg),
            "--dry-run",
            "--folder",
            str(tmp_path / "f"),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert dry.returncode == 0, dry.stderr
    assert "#SBATCH --nodes=2" in dry.stdout and "--signal=USR2@120" in dry.stdout
    assert "--total-batch 32" in dry.stdout and not (tmp_path / "f").exists()
    bad = subprocess.run(
        [sys.executable, "-m", "megdet_hpc.launch", "--config", str(tmp_path / "nope.yaml")],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 2 and bad.stderr.strip().startswith(
        "megdet_hpc.launch: error: config file not found"
    )


def _iteration(out: Path) -> int:
    metrics = out / "metrics.jsonl"
    if not metrics.exists():
        return 0
    return max((json.loads(x).get("iteration", 0) for x in metrics.read_text().splitlines()), default=0)


def test_preempted_job_requeues_resumes_and_matches(slurm_cluster: Path, tiny_config, tmp_path: Path) -> None:
    cfg = tiny_config(
        data={"images_per_gpu": 1},
        solver={"max_iter": 28, "warmup_iters": 5, "steps": [20]},
        train={"checkpoint_period": 0, "eval_at_end": False},
    )
    ref, cut = tmp_path / "ref", tmp_path / "cut"
    script = cpu_script(tmp_path)
    done = subprocess.run(
        ["sbatch", "--wait", str(script)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env=job_env(MEGDET_CONFIG=str(cfg), MEGDET_OUTPUT_DIR=str(ref)),
        timeout=400,
    )
    assert done.returncode == 0, done.stderr
    ref_log = "\n".join(p.read_text(errors="replace") for p in tmp_path.glob("*.out"))
    sub = subprocess.run(
        ["sbatch", "--parsable", str(script)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env=job_env(MEGDET_CONFIG=str(cfg), MEGDET_OUTPUT_DIR=str(cut)),
        check=True,
    )
    job_id = sub.stdout.strip().split(";")[0]
    deadline = time.time() + 240
    while _iteration(cut) < 5:
        assert time.time() < deadline, "job never reached iteration 5"
        time.sleep(0.2)
    # A job in the high-priority partition needs both CPUs: Slurm preempts (SIGTERM + USR2) and requeues.
    subprocess.run(
        ["sbatch", "-p", "high", "-n", "2", "-o", "/dev/null", "--wrap", "sleep 2"],
        check=True,
        capture_output=True,
    )
    wait_gone(job_id, timeout=400)
    log = "\n".join(p.read_text(errors="replace") for p in tmp_path.glob(f"*-{job_id}.out"))
    assert "restart 1" in log, log[-3000:]
    assert "stopped by" in log
    # 28 steps x 41 per-step collectives (20 CGBN layers x 2 + the vote) would overflow Horovod's
    # 1024-entry response cache if they were unnamed: stable names keep every step a cache hit.
    assert "evicted from cache" not in log + ref_log
    a = torch.load(ref / "model_0000028.pth", weights_only=True)
    b = torch.load(cut / "model_0000028.pth", weights_only=True)
    assert b["iteration"] == 28 and a["sampler"] == b["sampler"]
    for name, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][name]), name


def test_submitit_local_executor(tiny_config, tmp_path: Path) -> None:
    """--local: submitit's local executor starts 2 tasks; they rendezvous over torch gloo."""
    cfg = tiny_config(
        data={"images_per_gpu": 1},
        solver={"max_iter": 2},
        train={"checkpoint_period": 0, "eval_at_end": False},
    )
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "megdet_hpc.launch",
            "--local",
            "--gpus-per-node",
            "0",
            "--tasks-per-node",
            "2",
            "--time",
            "10",
            "--folder",
            str(tmp_path / "sub"),
            "--config",
            str(cfg),
            "--wait",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        env=job_env(),
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    state = torch.load(tmp_path / "out/model_0000002.pth", weights_only=True)
    assert state["world_size"] == 2


def test_submitit_job_checkpoints_requeues_and_resumes(
    slurm_cluster: Path, tiny_config, tmp_path: Path
) -> None:
    """USR2 (submitit's preemption signal) to a running submitit job: checkpoint, requeue, resume, done."""
    cfg = tiny_config(
        data={"images_per_gpu": 1},
        solver={"max_iter": 14, "warmup_iters": 5, "steps": [10]},
        train={"checkpoint_period": 0, "eval_at_end": False},
    )
    out = tmp_path / "out"
    proc = subprocess.Popen(
        submitit_command(tmp_path, cfg, timeout_min=30),
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=job_env(),
    )
    try:
        deadline = time.time() + 240
        while _iteration(out) < 3:
            assert time.time() < deadline and proc.poll() is None, "job never reached iteration 3"
            time.sleep(0.2)
        job_id = subprocess.run(
            ["squeue", "-h", "-o", "%i", "-n", SUBMITIT_JOB], capture_output=True, text=True, check=True
        ).stdout.split()[0]
        subprocess.run(["scancel", "--signal=USR2", job_id], check=True)
        stdout, stderr = proc.communicate(timeout=400)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, stdout + stderr
    assert "2 task(s) succeeded" in stdout
    logs = "\n".join(p.read_text(errors="replace") for p in (tmp_path / "sub").rglob("*_log.out"))
    assert "stopped by SIGUSR2" in logs and "requeued Slurm job" in logs and "resumed from" in logs
    state = torch.load(out / "model_0000014.pth", weights_only=True)
    assert state["iteration"] == 14 and state["world_size"] == 2
