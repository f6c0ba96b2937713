"""Resuming on another rank count, and what the non-finite guard tells the user.

Real processes: ``mpirun`` with the mpi backend for the re-shard (2 ranks, then 3), one process for
the non-finite abort.  What the job trained on is read back from the checkpoints it wrote (the
sampler state of every iteration), not from the code under test.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from test_faults import train


def _sampler_state(out: Path, iteration: int) -> dict:
    return torch.load(out / f"model_{iteration:07d}.pth", weights_only=True)["sampler"]


def test_resume_on_another_rank_count_neither_skips_nor_repeats(tiny_config, tmp_path: Path) -> None:
    """2 ranks x 2 images, stopped with 8 images of epoch 0 left; resumed on 3 ranks (total batch 6,
    LR rescaled): every one of the 8 is trained before epoch 1, and the rescale is said once."""
    from megdet_hpc.data.coco import CocoDetection
    from megdet_hpc.data.sampler import ResumableGroupedSampler

    cfg = tiny_config(
        solver={"total_batch": 4, "base_batch": 4, "max_iter": 4},
        train={"checkpoint_period": 1, "keep_checkpoints": 20, "eval_at_end": False},
    )
    out = tmp_path / "out"
    proc, _ = train(cfg, launcher="mpirun", nproc=2)
    assert proc.returncode == 0, proc.stderr[-2000:]
    left = _sampler_state(out, 4)
    assert left["epoch"] == 0 and len(left["remaining"]) == 8  # 24 images, 4 steps of 4 consumed

    proc, _ = train(cfg, "solver.max_iter=8", launcher="mpirun", nproc=3)
    assert proc.returncode == 0, proc.stderr[-2000:]
    text = proc.stdout + proc.stderr
    assert text.count("cannot keep the total batch 4; continuing with 6") == 1, text[-3000:]

    # What the 3-rank job trained on in iterations 5.. : replay its sampler from the state it resumed
    # with, and check the replay against the state the job itself wrote after each step.
    from megdet_hpc.config import load_config

    c = load_config(str(cfg))
    data = CocoDetection(c.data.train_images, c.data.train_annotations, train=True)
    replay = ResumableGroupedSampler(data.aspect_ratios, 6, 0, 1, seed=c.train.seed)
    replay.load_state_dict(left)
    trained_in_epoch_0: list[int] = []
    for iteration, keys in zip(range(5, 9), iter(replay)):
        epoch, number = keys[0][2], keys[0][3]
        assert replay.state_after(epoch, number) == _sampler_state(out, iteration)
        if epoch == 0:
            trained_in_epoch_0 += [k[0] for k in keys]
    assert set(left["remaining"]) <= set(trained_in_epoch_0)  # nothing of epoch 0 skipped
    assert len(set(left["remaining"])) == len(left["remaining"])
    # ... and what a bridge batch borrowed from epoch 1 is not trained again in epoch 1.
    borrowed = set(trained_in_epoch_0) - set(left["remaining"])
    epoch_1 = _sampler_state(out, 8)
    assert epoch_1["epoch"] == 1 and not borrowed & set(epoch_1["remaining"] or [])


def test_non_finite_messages_count_like_metrics_and_the_last_one_is_recorded(
    tiny_config, tmp_path: Path
) -> None:
    cfg = tiny_config(
        solver={"base_lr": 1e12, "warmup_iters": 0, "max_iter": 30, "max_nonfinite": 2},
        train={"checkpoint_period": 0, "log_period": 7, "eval_at_end": False},
    )
    proc, _ = train(cfg)
    assert proc.returncode == 4, proc.stderr[-2000:]
    said = [
        int(line.split("at iteration ")[1].split()[0])
        for line in proc.stdout.splitlines()
        if "non-finite loss or gradient at iteration" in line and "aborting" not in line
    ]
    rows = [json.loads(x) for x in (tmp_path / "out/metrics.jsonl").read_text().splitlines()]
    skipped = [r["iteration"] for r in rows if r.get("skipped")]
    assert said and said == skipped, (said, skipped)  # same numbers; the aborting step is in the file
    assert rows[-1]["iteration"] == said[-1] and "aborting after solver.max_nonfinite=2" in proc.stdout
