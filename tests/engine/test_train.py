"""End-to-end training on real processes: 1 process, horovodrun, mpirun, torchrun."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from conftest import write_tiny_config
from launchers import exit_probe_env, gloo_threads_at_exit, run, threads_at_exit

TRAIN = ["-m", "megdet_hpc.train"]


def read_metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_single_process_trains_checkpoints_and_evaluates(tiny_config, tmp_path: Path) -> None:
    cfg = tiny_config(train={"plots": True})
    proc = run("single", 1, [*TRAIN, "--config", str(cfg)], timeout=300)
    out = tmp_path / "out"
    rows = read_metrics(out)
    train_rows = [r for r in rows if "loss" in r]
    assert [r["iteration"] for r in train_rows] == [1, 2, 3, 4]
    assert train_rows[0]["lr"] == pytest.approx(0.01 * 0.001)  # warmup_factor x base_lr at 0 images
    assert all(r["images_per_s"] > 0 for r in train_rows)
    assert "AP50" in rows[-1]
    assert (out / "last_checkpoint").read_text().strip() == "model_0000004.pth"
    assert (out / "eval/metrics.json").exists() and (out / "eval/bbox_results.json").exists()
    assert (out / "training_curves.png").read_bytes()[:4] == b"\x89PNG"
    assert (out / "eval/pr_curves.png").read_bytes()[:4] == b"\x89PNG"
    assert "training done" in proc.stdout


@pytest.mark.parametrize("launcher", ["hvd-gloo", "hvd-mpi", "mpirun", "torchrun"])
def test_two_process_training(tiny_config, tmp_path: Path, launcher: str) -> None:
    cfg = tiny_config(data={"images_per_gpu": 1}, solver={"max_iter": 3}, train={"checkpoint_period": 0})
    probe = tmp_path / "threads"
    run(launcher, 2, [*TRAIN, "--config", str(cfg)], env=exit_probe_env(probe), timeout=300)
    out = tmp_path / "out"
    rows = [r for r in read_metrics(out) if "loss" in r]
    assert [r["iteration"] for r in rows] == [1, 2, 3]
    assert rows[-1]["images_seen"] == 6
    state = torch.load(out / "model_0000003.pth", weights_only=True)
    assert state["world_size"] == 2 and len(state["rng"]) == 2 and state["total_batch"] == 2
    # No process group lives on into interpreter finalisation, where its threads may abort a rank
    # that finished (tests/distributed/test_shutdown.py).
    assert len(threads_at_exit(probe)) >= 2 and gloo_threads_at_exit(probe) == {}


def test_two_ranks_one_image_equals_one_rank_two_images(tiny_config, tmp_path: Path) -> None:
    """MegDet's claim made testable: with CGBN, 2 GPUs x 1 image is the same SGD step as 1 GPU x 2
    images (same images, same per-image RPN/RoI samples)."""
    common = {
        "solver": {"max_iter": 1, "warmup_iters": 0, "base_lr": 0.02},
        "train": {"checkpoint_period": 1, "eval_at_end": False},
    }
    two = tiny_config("two.yaml", data={"images_per_gpu": 1}, **common)
    one = tiny_config("one.yaml", data={"images_per_gpu": 2}, **common)
    run(
        "hvd-gloo",
        2,
        [*TRAIN, "--config", str(two), f"train.output_dir={tmp_path}/two"],
        env={"MEGDET_CGBN_COMM": "main"},
    )
    run("single", 1, [*TRAIN, "--config", str(one), f"train.output_dir={tmp_path}/one"])
    a = torch.load(tmp_path / "two/model_0000001.pth", weights_only=True)["model"]
    b = torch.load(tmp_path / "one/model_0000001.pth", weights_only=True)["model"]
    init = torch.load(tmp_path / "one/model_0000001.pth", weights_only=True)
    assert init["iteration"] == 1
    worst = max((a[k].double() - b[k].double()).abs().max().item() for k in a if a[k].is_floating_point())
    assert worst <= 1e-4, worst
    # And the step really moved the weights (the comparison is not vacuous).
    from megdet_hpc.config import load_config
    from megdet_hpc.modeling import build_model

    torch.manual_seed(0)
    fresh = build_model(load_config(one)).state_dict()
    moved = max(
        (fresh[k] - b[k]).abs().max().item() for k in b if b[k].is_floating_point() and "running" not in k
    )
    assert moved > 1e-3


GRADIENT_STEP = {
    "solver": {"max_iter": 1, "warmup_iters": 0, "base_lr": 0.02, "grad_sync": "overlap"},
    "train": {"checkpoint_period": 1, "eval_at_end": False},
    "data": {"images_per_gpu": 1},
}


@pytest.fixture(scope="module")
def overlapped_step(tmp_path_factory: pytest.TempPathFactory, tiny_data: Path) -> dict:
    """The reference of every gradient path: one 2-rank step of Horovod overlapped
    (DistributedOptimizer), run once for the module."""
    folder = tmp_path_factory.mktemp("overlapped")
    ref = write_tiny_config(folder, tiny_data, "ref.yaml", **copy.deepcopy(GRADIENT_STEP))
    run("hvd-gloo", 2, [*TRAIN, "--config", str(ref), f"train.output_dir={folder}/ref"])
    return torch.load(folder / "ref/model_0000001.pth", weights_only=True)["model"]


@pytest.mark.parametrize(
    ("launcher", "variant"),
    [
        ("hvd-gloo", {"train": {"channels_last": True}}),
        ("torchrun", {"solver": {"grad_sync": "after_backward"}}),
        ("mpirun", {}),
    ],
)
def test_gradient_paths_agree(
    tiny_config, tmp_path: Path, launcher: str, variant: dict, overlapped_step
) -> None:
    """Every gradient path takes the same 2-rank step: Horovod overlapped (DistributedOptimizer) is the
    reference; the variant runs the coalesced after-backward path (forced, or auto for mpi, or because
    Horovod's hooks refuse channels_last gradients)."""
    common = copy.deepcopy(GRADIENT_STEP)
    for section, values in variant.items():
        common[section] = {**common.get(section, {}), **values}
    common["solver"] = {**common["solver"], "grad_sync": variant.get("solver", {}).get("grad_sync", "auto")}
    other = tiny_config("other.yaml", **common)
    proc = run(launcher, 2, [*TRAIN, "--config", str(other), f"train.output_dir={tmp_path}/other"])
    a = overlapped_step
    b = torch.load(tmp_path / "other/model_0000001.pth", weights_only=True)["model"]
    worst = max((a[k].double() - b[k].double()).abs().max().item() for k in a if a[k].is_floating_point())
    assert worst <= 1e-5, worst
    assert "gradients averaged after backward" in proc.stdout


def test_non_finite_loss_is_reported_and_aborts(tiny_config, tmp_path: Path) -> None:
    cfg = tiny_config(
        solver={"base_lr": 1e12, "warmup_iters": 0, "max_iter": 8, "max_nonfinite": 2},
        train={"checkpoint_period": 1, "keep_checkpoints": 10},
    )
    proc = run("single", 1, [*TRAIN, "--config", str(cfg)], check=False)
    assert proc.returncode == 4, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "aborting after solver.max_nonfinite=2" in proc.stdout
    bad = [
        int(line.split("at iteration ")[1].split()[0])
        for line in proc.stdout.splitlines()
        if "non-finite loss or gradient at iteration" in line
    ]
    assert len(bad) >= 2 and bad[1] == bad[0] + 1
    # The skipped step left the model exactly as it was: checkpoint after it == checkpoint before it
    # (messages number iterations as metrics.jsonl and checkpoint names do: the first step is 1).
    out = tmp_path / "out"
    before = torch.load(out / f"model_{bad[0] - 1:07d}.pth", weights_only=True)
    after = torch.load(out / f"model_{bad[0]:07d}.pth", weights_only=True)
    assert after["iteration"] == before["iteration"] + 1
    for name, tensor in before["model"].items():
        assert torch.equal(tensor, after["model"][name]), name


def test_missing_data_is_a_one_line_error(tiny_config, tmp_path: Path) -> None:
    cfg = tiny_config(data={"train_images": str(tmp_path / "nowhere")})
    proc = run("single", 1, [*TRAIN, "--config", str(cfg)], check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("megdet_hpc.train: error: image folder not found")


def test_missing_weights_file_is_a_one_line_error(tiny_config, tmp_path: Path) -> None:
    cfg = tiny_config(model={"backbone_weights": str(tmp_path / "r18.pth")})
    proc = run("single", 1, [*TRAIN, "--config", str(cfg)], check=False)
    assert proc.returncode == 2
    assert "model.backbone_weights file not found" in proc.stderr.strip().splitlines()[-1]


@pytest.mark.parametrize(
    ("launcher", "sections", "message"),
    [
        (
            "mpirun",
            {"solver": {"fp16_compression": True}},
            "solver.fp16_compression needs Horovod's overlapped",
        ),
        (
            "hvd-gloo",
            {"solver": {"grad_sync": "overlap"}, "train": {"channels_last": True}},
            "solver.grad_sync=overlap cannot run a channels_last model on Horovod",
        ),
    ],
)
def test_gradient_path_the_backend_cannot_run_is_a_one_line_error(
    tiny_config, tmp_path: Path, launcher: str, sections: dict, message: str
) -> None:
    cfg = tiny_config(data={"images_per_gpu": 1}, **sections)
    proc = run(launcher, 2, [*TRAIN, "--config", str(cfg)], check=False)
    assert proc.returncode != 0
    errors = [line for line in (proc.stdout + proc.stderr).splitlines() if "megdet_hpc.train: error:" in line]
    assert errors and message in errors[0], proc.stderr[-2000:]
    assert not list((tmp_path / "out").glob("model_*.pth"))


def test_local_weights_load(tiny_config, tmp_path: Path) -> None:
    import torchvision

    from megdet_hpc.config import load_config
    from megdet_hpc.modeling import build_model

    body = torchvision.models.resnet18(weights=None)
    with torch.no_grad():
        body.conv1.weight.fill_(0.125)
    torch.save(body.state_dict(), tmp_path / "r18.pth")
    model = build_model(load_config(tiny_config(model={"backbone_weights": str(tmp_path / "r18.pth")})))
    assert torch.equal(model.backbone.body.conv1.weight, body.conv1.weight)
    full = tmp_path / "full.pth"
    torch.save(model.state_dict(), full)
    again = build_model(load_config(tiny_config("b.yaml", model={"weights": str(full)})))
    assert torch.equal(again.backbone.body.conv1.weight, body.conv1.weight)
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    from megdet_hpc.config import ConfigError

    with pytest.raises(ConfigError, match="cannot be loaded"):
        build_model(load_config(tiny_config("c.yaml", model={"weights": str(tmp_path / "junk.pth")})))


def test_evaluate_cli_on_a_checkpoint(tiny_config, tmp_path: Path) -> None:
    cfg = tiny_config(solver={"max_iter": 2}, train={"eval_at_end": False})
    run("single", 1, [*TRAIN, "--config", str(cfg)])
    proc = run(
        "mpirun", 2, ["-m", "megdet_hpc.evaluate", "--config", str(cfg), "--out", str(tmp_path / "ev")]
    )
    line = [x for x in proc.stdout.splitlines() if x.startswith("{")][-1]
    metrics = json.loads(line)
    assert metrics["checkpoint"].endswith("model_0000002.pth") and 0.0 <= metrics["AP50"] <= 1.0
    assert (tmp_path / "ev/bbox_results.json").exists()
    empty = run(
        "single",
        1,
        ["-m", "megdet_hpc.evaluate", "--config", str(cfg), "train.output_dir=" + str(tmp_path / "nothing")],
        check=False,
    )
    assert empty.returncode == 2 and "no usable checkpoint" in empty.stderr
