"""The three commands of the mission, verbatim, from the checkout.

* ``sbatch slurm/train_128gpu.sh``: accepted (``--test-only``) by a cluster its size -- the 16-node,
  8-fake-GPU cluster of ``multinode_cluster`` -- and a CPU variant of the same template really runs with
  no ``logs/`` folder prepared (``test_slurm_jobs.py``); on 2 nodes in ``test_multinode.py``.
* ``python -m megdet_hpc.launch --nodes 16``: 16 x 8 GPUs x 2 images = 256, so the bs256 config
  (``--dry-run`` shows it); really submitted to that cluster (then cancelled); a job larger than the
  cluster is refused by sbatch in one line.
* ``horovodrun -np 8 python -m megdet_hpc.train``: the default config for 8 x 2 images, 8 ranks
  oversubscribed on this machine, a few iterations on tiny images.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]


def env_with_venv(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(PATH=f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}", OMP_NUM_THREADS="1", **extra)
    env.pop("MEGDET_COMM", None)
    return env


@pytest.mark.slurm
def test_sbatch_train_128gpu_is_accepted_by_a_cluster_its_size(multinode_cluster) -> None:
    proc = subprocess.run(
        ["sbatch", "--test-only", "slurm/train_128gpu.sh"],
        cwd=REPO,
        capture_output=True,
        text=True,
        env=multinode_cluster.env(),
    )
    assert proc.returncode == 0, proc.stderr
    assert "using 1024 processors on nodes node[1-16] in partition low" in proc.stderr, proc.stderr
    script = (REPO / "slurm/train_128gpu.sh").read_text()
    assert "#SBATCH --nodes=16" in script and "#SBATCH --output=%x-%j.out" in script  # no folder to prepare
    assert "DEFAULT_CONFIG=configs/megdet_r50_fpn_bs256.yaml" in script and "--total-batch 256" in script


def test_launch_nodes_16_dry_run_shows_the_config_chosen_by_gpu_count(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "megdet_hpc.launch", "--nodes", "16", "--dry-run"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env=env_with_venv(),
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "#SBATCH --nodes=16" in proc.stdout and "#SBATCH --gpus-per-node=8" in proc.stdout
    assert "total batch 256; config" in proc.stdout and "megdet_r50_fpn_bs256.yaml" in proc.stdout
    assert "--total-batch 256" in proc.stdout
    assert not list(tmp_path.iterdir())  # a dry run submits and writes nothing


@pytest.mark.slurm
def test_launch_nodes_16_verbatim_really_submits(multinode_cluster, tmp_path: Path) -> None:
    """Submitted for real; the partition is held DOWN meanwhile (jobs queue, none starts) so the
    128-task COCO job never runs here, and it is cancelled."""
    cluster = multinode_cluster
    cluster.run("scontrol", "update", "partitionname=low", "state=down")
    job = ""
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "megdet_hpc.launch", "--nodes", "16"],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            env=cluster.env(),
            timeout=120,
        )
        assert proc.returncode == 0, proc.stdout + proc.stderr
        job = proc.stdout.split("submitted job ", 1)[1].split()[0]
        assert "world size 128 x 2 image(s) = total batch 256" in proc.stdout
        shown = cluster.run("scontrol", "show", "job", job).stdout
        assert "JobState=PENDING" in shown and "NumNodes=16" in shown and "NumTasks=128" in shown, shown
        refused = subprocess.run(
            [sys.executable, "-m", "megdet_hpc.launch", "--nodes", "17"],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            env=cluster.env(),
            timeout=120,
        )
        assert refused.returncode == 2, refused.stdout + refused.stderr
        lines = refused.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("megdet_hpc.launch: error: sbatch refused the job:"), (
            refused.stderr
        )
    finally:
        if job:
            cluster.run("scancel", job, check=False)
        cluster.run("scontrol", "update", "partitionname=low", "state=up")


def test_horovodrun_np_8_trains_with_the_default_config(tiny_data: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    overrides = [
        "model.backbone=resnet18",
        "model.num_classes=3",
        "model.min_size=64",
        "model.max_size=64",
        "model.anchor_sizes=[8,16,32,64,128]",
        "model.box_batch_size_per_image=32",
        "model.box_head_dim=64",
        "model.rpn_batch_size_per_image=64",
        "solver.max_iter=2",
        "solver.warmup_iters=1",
        "data.num_workers=0",
        f"data.train_images={tiny_data}/train",
        f"data.train_annotations={tiny_data}/annotations/instances_train.json",
        f"data.val_images={tiny_data}/val",
        f"data.val_annotations={tiny_data}/annotations/instances_val.json",
        f"train.output_dir={out}",
        "train.eval_at_end=false",
        "train.tensorboard=false",
        "train.threads=1",
    ]
    proc = subprocess.run(
        ["horovodrun", "-np", "8", sys.executable, "-m", "megdet_hpc.train", *overrides],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
        env=env_with_venv(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1"),
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "no --config: using" in proc.stdout and "megdet_r50_fpn_bs16.yaml at total batch 16" in proc.stdout
    state = torch.load(out / "model_0000002.pth", weights_only=True)
    assert (
        state["world_size"] == 8
        and state["total_batch"] == 16
        and state["config"]["solver"]["total_batch"] == 16
    )
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["iteration"] == 2 and rows[-1]["images_seen"] == 32
