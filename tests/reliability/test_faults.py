"""Fault injection: real processes, real launchers, small data -- one test per case of the audit.

Each test asserts the exit code, the one-line message (no traceback), that the job ends (generous hang
guards, not timings) and that nothing already written changed.  The README's "What happens when..."
table lists the same cases.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from launchers import REPO, command, run

from megdet_hpc.launch.local import local_env

TRAIN = ["-m", "megdet_hpc.train"]
HANG_GUARD = 120  # seconds: far above any of these runs, far below a wall time


# -- helpers --------------------------------------------------------------------------------------------
def tree(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` with its checksum (what "nothing changed" compares)."""
    if not folder.exists():
        return {}
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != ".megdet.lock"
    }


def unchanged_but_the_log(folder: Path, before: dict[str, str], log: str) -> bool:
    """Every file as it was, except that the run's log may have gained lines (what the failed attempt
    said) -- nothing of it lost."""
    now = tree(folder)
    return {k: v for k, v in now.items() if k != "log.txt"} == {
        k: v for k, v in before.items() if k != "log.txt"
    } and (folder / "log.txt").read_text().startswith(log)


def one_line_error(proc: subprocess.CompletedProcess[str], prog: str = "megdet_hpc.train") -> str:
    """The single ``prog: error: ...`` line of a failed run (and no traceback anywhere).  Under mpirun
    the ranks share one stderr, so another rank's progress bar may precede it on the same line."""
    text = proc.stdout + proc.stderr
    assert "Traceback" not in text, text[-3000:]
    marker = f"{prog}: error:"
    errors = [marker + line.split(marker, 1)[1] for line in proc.stderr.splitlines() if marker in line]
    assert errors, proc.stderr[-3000:]
    assert len(set(errors)) == 1, errors  # one line (every rank may print the same one)
    return errors[0]


def timed(
    launcher: str, nproc: int, argv: list[str], **kwargs
) -> tuple[subprocess.CompletedProcess[str], float]:
    t0 = time.monotonic()
    proc = run(launcher, nproc, argv, check=False, timeout=HANG_GUARD, **kwargs)
    return proc, time.monotonic() - t0


def train(cfg: Path, *extra: str, launcher: str = "single", nproc: int = 1, env: dict | None = None):
    return timed(launcher, nproc, [*TRAIN, "--config", str(cfg), *extra], env=env)


def start(cfg: Path, *extra: str, launcher: str = "single", nproc: int = 1) -> subprocess.Popen:
    env = local_env(launcher, pythonpath=str(REPO))
    return subprocess.Popen(
        command(launcher, nproc, [*TRAIN, "--config", str(cfg), *extra]),
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_for(predicate, proc: subprocess.Popen | None = None, timeout: float = HANG_GUARD) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"exited early ({proc.returncode}): {proc.stderr.read()[-2000:]}")
        time.sleep(0.1)


def iteration_of(out: Path) -> int:
    metrics = out / "metrics.jsonl"
    if not metrics.exists():
        return 0
    rows = [json.loads(x) for x in metrics.read_text().splitlines() if x.strip()]
    return max((r.get("iteration", 0) for r in rows), default=0)


def finish(proc: subprocess.Popen, timeout: float = HANG_GUARD) -> tuple[int, str, str]:
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
    return proc.returncode, out, err


@pytest.fixture
def finished_run(tiny_config, tmp_path: Path) -> tuple[Path, Path]:
    """A 6-iteration run with checkpoints at 2, 4, 6 and an evaluation."""
    cfg = tiny_config(
        solver={"max_iter": 6}, train={"checkpoint_period": 2, "keep_checkpoints": 3, "plots": True}
    )
    proc, _ = train(cfg)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return cfg, tmp_path / "out"


def copy_data(tiny_data: Path, tmp_path: Path) -> Path:
    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    return data


# -- severe ---------------------------------------------------------------------------------------------
def _first_batch_image(data: Path, rank: int) -> Path:
    """The image the given rank reads in the first step (2 ranks x 1 image, seed 0)."""
    from megdet_hpc.data.coco import CocoDetection
    from megdet_hpc.data.sampler import ResumableGroupedSampler

    ds = CocoDetection(data / "train", data / "annotations/instances_train.json", train=True)
    sampler = ResumableGroupedSampler(ds.aspect_ratios, 2, rank, 2, seed=0)
    index = next(iter(sampler))[0][0]
    return data / "train" / ds.coco.imgs[ds.ids[index]]["file_name"]


def test_mpi_backend_a_failing_rank_ends_the_job(tiny_config, tiny_data: Path, tmp_path: Path) -> None:
    """A truncated JPEG met by one rank under mpirun (mpi backend): before, that rank blocked in
    MPI_Finalize while its peer waited in the next collective, until the wall time."""
    data = copy_data(tiny_data, tmp_path)
    bad = _first_batch_image(data, rank=1)
    bad.write_bytes(bad.read_bytes()[:300])
    cfg = tiny_config(
        data={
            "images_per_gpu": 1,
            "train_images": str(data / "train"),
            "train_annotations": str(data / "annotations/instances_train.json"),
        },
        solver={"max_iter": 50},
    )
    proc, elapsed = train(cfg, launcher="mpirun", nproc=2)
    assert proc.returncode != 0 and elapsed < HANG_GUARD
    line = one_line_error(proc)
    assert f"cannot read image {bad}" in line, line


def test_mpi_backend_a_killed_loader_worker_ends_the_job(tiny_config, tmp_path: Path) -> None:
    cfg = tiny_config(
        data={"images_per_gpu": 1, "num_workers": 1},
        solver={"max_iter": 100000},
        train={"checkpoint_period": 0, "eval_at_end": False},
    )
    out = tmp_path / "out"
    proc = start(cfg, launcher="mpirun", nproc=2)
    wait_for(lambda: iteration_of(out) >= 2, proc)
    ranks = [p for p in psutil.Process(proc.pid).children() if "megdet_hpc.train" in " ".join(p.cmdline())]
    workers = ranks[-1].children()  # the rank's DataLoader worker
    assert workers, "no DataLoader worker found"
    workers[0].send_signal(signal.SIGKILL)
    t0 = time.monotonic()
    code, _, err = finish(proc)
    assert code != 0 and time.monotonic() - t0 < HANG_GUARD, err[-2000:]
    assert "DataLoader worker" in err


def test_horovod_backend_a_frozen_rank_is_reported_and_the_job_ends(tiny_config, tmp_path: Path) -> None:
    """The stall watchdog under horovodrun (Horovod over MPI): rank 1 frozen with SIGSTOP; rank 0,
    blocked in a Horovod collective, names it in one line and exits 5; the launcher ends the job.
    (Across nodes, with srun, for the mpi and torch backends: tests/launch/test_multinode.py.)"""
    cfg = tiny_config(
        data={"images_per_gpu": 1},
        solver={"max_iter": 100000},
        train={"checkpoint_period": 2, "eval_at_end": False, "stall_timeout_s": 20},
    )
    out = tmp_path / "out"
    proc = start(cfg, launcher="hvd-mpi", nproc=2)
    wait_for(lambda: iteration_of(out) >= 3, proc)
    ranks = [
        p
        for p in psutil.Process(proc.pid).children(recursive=True)
        if "megdet_hpc.train" in " ".join(p.cmdline())
    ]
    frozen = next(p for p in ranks if p.environ().get("OMPI_COMM_WORLD_RANK") == "1")
    before = tree(out)
    frozen.send_signal(signal.SIGSTOP)
    t0 = time.monotonic()
    code, stdout, stderr = finish(proc)
    print(f"horovod, frozen rank: the job ended {time.monotonic() - t0:.1f} s after SIGSTOP (timeout 20 s)")
    assert code != 0
    marker = "megdet_hpc.train: error: stalled:"
    lines = [line[line.index(marker) :] for line in (stdout + stderr).splitlines() if marker in line]
    # Rank 0's one line; the frozen rank may add its own if the launcher's SIGCONT thaws it at the end.
    assert [line for line in lines if "rank 0 of 2 on" in line] == lines[:1] and len(lines) <= 2, lines
    assert re.search(r"waits in (allreduce|broadcast|barrier|allgather_object)", lines[0]), lines
    assert "exiting with code 5" in lines[0]
    assert {k: v for k, v in tree(out).items() if k in before and k.startswith("model_")} == {
        k: v for k, v in before.items() if k.startswith("model_")
    }


def test_a_checkpoint_copied_without_its_manifest_is_resumed(finished_run, tmp_path: Path) -> None:
    cfg, base = finished_run
    fork = tmp_path / "fork"
    fork.mkdir()
    shutil.copy(base / "model_0000006.pth", fork)
    before = tree(fork)
    proc, _ = train(cfg, f"train.output_dir={fork}", "solver.max_iter=8")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "model_0000006.pth has no manifest" in proc.stdout + proc.stderr and "resumed from" in proc.stdout
    assert tree(fork)["model_0000006.pth"] == before["model_0000006.pth"]  # the user's file is untouched
    assert torch.load(fork / "model_0000008.pth", weights_only=True)["iteration"] == 8


def test_unusable_checkpoints_stop_the_job_instead_of_a_silent_restart(finished_run) -> None:
    cfg, out = finished_run
    for name in ("model_0000002.pth", "model_0000004.pth", "model_0000006.pth"):
        path = out / name
        path.write_bytes(path.read_bytes()[:1000])
    before, log = tree(out), (out / "log.txt").read_text()
    proc, _ = train(cfg, "solver.max_iter=8")
    assert proc.returncode == 2
    line = one_line_error(proc)
    assert "none of the 3 checkpoint(s)" in line and "--no-resume" in line
    assert unchanged_but_the_log(out, before, log)  # metrics.jsonl not appended, nothing overwritten


def test_one_writer_per_output_dir_and_evaluation_of_a_live_run(tiny_config, tmp_path: Path) -> None:
    """A second training is refused naming the holder; `evaluate` on the live run leaves it alone."""
    cfg = tiny_config(
        solver={"max_iter": 30}, train={"checkpoint_period": 1, "keep_checkpoints": 40, "eval_at_end": False}
    )
    out = tmp_path / "out"
    live = start(cfg)
    wait_for(lambda: iteration_of(out) >= 3, live)
    second, elapsed = train(cfg)
    assert second.returncode == 2 and elapsed < HANG_GUARD
    line = one_line_error(second)
    assert f"{out} is in use by another training (pid {live.pid}" in line
    evaluation = run(
        "single", 1, ["-m", "megdet_hpc.evaluate", "--config", str(cfg)], check=False, timeout=HANG_GUARD
    )
    assert evaluation.returncode == 0, evaluation.stderr[-2000:]
    assert "removed" not in evaluation.stdout + evaluation.stderr  # no clean-up of the live writer's files
    code, stdout, stderr = finish(live)
    assert code == 0, stderr[-2000:]  # the live run saved every iteration to the end
    assert (out / "last_checkpoint").read_text().strip() == "model_0000030.pth"
    assert list((out / "evaluate").iterdir())  # evaluate wrote beside, not into, the run's files


def test_a_killed_writer_neither_locks_out_nor_leaves_temporaries(tiny_config, tmp_path: Path) -> None:
    cfg = tiny_config(solver={"max_iter": 10000}, train={"checkpoint_period": 1, "eval_at_end": False})
    out = tmp_path / "out"
    victim = start(cfg)
    wait_for(lambda: iteration_of(out) >= 3, victim)
    victim.send_signal(signal.SIGKILL)
    finish(victim)
    (out / f".model_0000099.pth.tmp-{os.uname().nodename}-{victim.pid}").write_bytes(b"partial")
    proc, _ = train(cfg, "solver.max_iter=5")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (
        re.search(r"removed \d+ temporary file\(s\)", proc.stdout + proc.stderr)
        and "resumed from" in proc.stdout
    )
    assert not list(out.glob(".*.tmp-*"))


def test_a_hash_in_an_override_is_part_of_the_value(tiny_config, tmp_path: Path) -> None:
    cfg = tiny_config(solver={"max_iter": 1}, train={"checkpoint_period": 1, "eval_at_end": False})
    other = tmp_path / "exp"
    proc, _ = train(cfg, f"train.output_dir={other}")
    assert proc.returncode == 0
    before = tree(other)
    proc, _ = train(cfg, f"train.output_dir={other} #2")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (tmp_path / "exp #2" / "model_0000001.pth").exists() and tree(other) == before


# -- one-line errors before anything is written -------------------------------------------------------------
def _break_json(data: Path, change) -> None:  # type: ignore[no-untyped-def]
    path = data / "annotations/instances_train.json"
    content = json.loads(path.read_text())
    change(content)
    path.write_text(json.dumps(content))


BAD_INPUTS = {
    "log_period=0": (["train.log_period=0"], "train.log_period must be > 0"),
    "num_classes below the categories": (["model.num_classes=1"], "model.num_classes=1 but"),
    "device cuda without a GPU": (["train.device=cuda"], "train.device=cuda but no CUDA device"),
    "unknown requeue signal": (["train.requeue_signals=[SIGFOO]"], "unknown signal 'SIGFOO'"),
    "negative num_workers": (["data.num_workers=-1"], "data.num_workers must be >= 0"),
    "negative momentum": (["solver.momentum=-5"], "solver.momentum must be in [0, 1)"),
    "total batch 0": (["--total-batch", "0"], "--total-batch must be > 0"),
    "missing val annotations": (
        ["data.val_annotations=/nonexistent/val.json"],
        "annotation file not found: /nonexistent/val.json",
    ),
    "scientific notation accepted, bad value refused": (
        ["solver.base_lr=1e-4", "solver.max_iter=-1"],
        "solver.max_iter must be > 0",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_config_values_are_one_line_errors(tiny_config, tmp_path: Path, case: str) -> None:
    extra, message = BAD_INPUTS[case]
    proc, elapsed = train(tiny_config(), *extra)
    assert proc.returncode == 2 and elapsed < HANG_GUARD
    assert message in one_line_error(proc)
    assert not (tmp_path / "out").exists()  # validated before anything was written


BAD_DATA = {
    "no categories": (lambda d: d.pop("categories"), "no 'categories' list"),
    "image without width": (lambda d: d["images"][0].pop("width"), "has no integer 'width'"),
    "image without file_name": (lambda d: d["images"][0].pop("file_name"), "has no 'file_name'"),
    "annotation without bbox": (lambda d: d["annotations"][0].pop("bbox"), "has no 'bbox'"),
    "bbox with 3 numbers": (
        lambda d: d["annotations"][0].update(bbox=[1, 2, 3]),
        "expected 4 finite numbers",
    ),
    "NaN coordinate": (
        lambda d: d["annotations"][0].update(bbox=[float("nan"), 1, 5, 5]),
        "has bbox [nan, 1, 5, 5]",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_DATA))
def test_malformed_coco_files_are_one_line_errors(
    tiny_config, tiny_data: Path, tmp_path: Path, case: str
) -> None:
    change, message = BAD_DATA[case]
    data = copy_data(tiny_data, tmp_path)
    _break_json(data, change)
    cfg = tiny_config(
        data={
            "train_images": str(data / "train"),
            "train_annotations": str(data / "annotations/instances_train.json"),
        }
    )
    proc, _ = train(cfg)
    assert proc.returncode == 2 and message in one_line_error(proc)
    assert not (tmp_path / "out").exists()


def test_output_dir_that_is_a_file_or_read_only(tiny_config, tmp_path: Path) -> None:
    cfg = tiny_config(solver={"max_iter": 1})
    blocker = tmp_path / "file"
    blocker.write_text("keep")
    proc, _ = train(cfg, f"train.output_dir={blocker}")
    assert proc.returncode == 2 and "exists and is not a directory" in one_line_error(proc)
    assert blocker.read_text() == "keep"
    ro = tmp_path / "ro"
    ro.mkdir()
    subprocess.run(["mount", "--bind", str(ro), str(ro)], check=True)
    try:
        subprocess.run(["mount", "-o", "remount,bind,ro", str(ro)], check=True)
        proc, _ = train(cfg, f"train.output_dir={ro / 'run'}")
        assert proc.returncode == 2 and "Read-only file system" in one_line_error(proc)
    finally:
        subprocess.run(["umount", str(ro)], check=True)


def test_resuming_with_another_model_names_the_differences(finished_run) -> None:
    cfg, out = finished_run
    before, log = tree(out), (out / "log.txt").read_text()
    proc, _ = train(cfg, "model.backbone=resnet34", "model.num_classes=5", "solver.max_iter=8")
    assert proc.returncode == 2
    line = one_line_error(proc)
    assert "model.backbone: 'resnet18' -> 'resnet34'" in line and "model.num_classes: 3 -> 5" in line
    assert unchanged_but_the_log(out, before, log)


def test_eval_only_with_nothing_to_evaluate(tiny_config, tmp_path: Path) -> None:
    proc, _ = train(tiny_config(), "--eval-only")
    assert proc.returncode == 2 and "--eval-only: nothing to evaluate" in one_line_error(proc)
    assert not list((tmp_path / "out").glob("eval*"))


def test_unknown_categories_are_reported_and_sizes_checked(
    tiny_config, tiny_data: Path, tmp_path: Path
) -> None:
    data = copy_data(tiny_data, tmp_path)
    _break_json(data, lambda d: d["annotations"][0].update(category_id=99))
    cfg = tiny_config(
        data={
            "train_images": str(data / "train"),
            "train_annotations": str(data / "annotations/instances_train.json"),
        },
        solver={"max_iter": 1},
        train={"eval_at_end": False},
    )
    proc, _ = train(cfg)
    assert proc.returncode == 0 and "1 unknown category" in proc.stdout
    _break_json(data, lambda d: [img.update(width=32) for img in d["images"]])  # JPEGs are 64 px wide
    proc, _ = train(cfg, f"train.output_dir={tmp_path}/sizes")
    assert proc.returncode == 2 and "is 64x64 but instances_train.json says 32x64" in one_line_error(proc)


# -- also wrong -------------------------------------------------------------------------------------------
def test_disk_full_is_named_at_the_save_that_failed(tiny_config, tmp_path: Path) -> None:
    small = tmp_path / "small"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(small)], check=True)
    try:
        cfg = tiny_config(solver={"max_iter": 6}, train={"checkpoint_period": 2, "eval_at_end": False})
        proc, elapsed = train(cfg, f"train.output_dir={small / 'run'}")
        assert proc.returncode == 2 and elapsed < HANG_GUARD
        line = one_line_error(proc)
        assert "checkpoint save at iteration 2 failed: no space left on device writing" in line, line
        assert not list((small / "run").glob(".*.tmp-*"))  # the partial file is removed
    finally:
        subprocess.run(["umount", str(small)], check=True)


@pytest.fixture(scope="module")
def big_val(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A validation split long enough that an evaluation lasts a while on 2 cores."""
    from megdet_hpc.data.synthetic import generate

    return generate(tmp_path_factory.mktemp("bigval") / "d", train=24, val=400, size=64, seed=2)


@pytest.mark.parametrize("when", ["periodic", "final"])
def test_a_signal_interrupts_an_evaluation(tiny_config, big_val: Path, tmp_path: Path, when: str) -> None:
    val = {
        "val_images": str(big_val / "val"),
        "val_annotations": str(big_val / "annotations/instances_val.json"),
    }
    periodic = when == "periodic"
    cfg = tiny_config(
        data=val,
        eval={"max_images": 0},
        solver={"max_iter": 6 if periodic else 2},
        train={"eval_period": 2 if periodic else 0, "checkpoint_period": 0},
    )
    proc = start(cfg)
    out = tmp_path / "out"
    wait_for(lambda: iteration_of(out) >= 2, proc)  # iteration 2 is logged: its evaluation starts now
    time.sleep(1.0)
    proc.send_signal(signal.SIGUSR1)
    t0 = time.monotonic()
    code, stdout, stderr = finish(proc)
    assert code == 3, stderr[-2000:]
    assert time.monotonic() - t0 < 30  # between two batches, not after 400 images
    assert "evaluation at iteration 2 interrupted by a signal" in stdout
    assert (out / "model_0000002.pth").exists() and "stopped by SIGUSR1 at iteration 2" in stdout


def test_a_loader_worker_error_is_one_line_naming_the_file(
    tiny_config, tiny_data: Path, tmp_path: Path
) -> None:
    data = copy_data(tiny_data, tmp_path)
    for image in (data / "train").glob("*.jpg"):
        image.write_bytes(image.read_bytes()[:200])
    cfg = tiny_config(
        data={
            "num_workers": 1,
            "train_images": str(data / "train"),
            "train_annotations": str(data / "annotations/instances_train.json"),
        }
    )
    proc, _ = train(cfg)
    assert proc.returncode == 2
    line = one_line_error(proc)
    assert line.startswith(f"megdet_hpc.train: error: cannot read image {data / 'train'}/train_0000")
    assert "DataLoader worker" not in line


def test_no_resume_archives_everything_and_takes_overrides_after_flags(finished_run) -> None:
    cfg, out = finished_run
    before = tree(out)
    proc, _ = train(cfg, "--no-resume", "solver.max_iter=1", "train.eval_at_end=false")
    assert proc.returncode == 0, proc.stderr[-2000:]
    (archive,) = (out / "archive").iterdir()
    assert tree(archive) == before  # checkpoints, metrics, log, eval/, curves: all of it, unchanged
    assert {"log.txt", "metrics.jsonl", "training_curves.png", "eval/metrics.json"} <= set(before)
    assert "moved the previous run's files" in (out / "log.txt").read_text()
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 1  # a fresh history


LAUNCH_ERRORS = {
    "sbatch --cpus-per-task 0": (
        ["sbatch", "--gpus", "2", "--cpus-per-task", "0"],
        "--cpus-per-task must be >= 1",
    ),
    "sbatch --signal-lead -5": (
        ["sbatch", "--gpus", "2", "--signal-lead", "-5"],
        "--signal-lead must be >= 0",
    ),
    "sbatch missing config": (
        ["sbatch", "--gpus", "2", "--config", "/nope.yaml"],
        "--config /nope.yaml does not exist",
    ),
    "submitit control character": (
        ["--dry-run", "--job-name", "a\nb"],
        "--job-name contains a control character",
    ),
    "submitit --cpus-per-task 0": (["--dry-run", "--cpus-per-task", "0"], "--cpus-per-task must be >= 1"),
    "submitit missing config": (["--dry-run", "--config", "/nope.yaml"], "config file not found: /nope.yaml"),
    "local -np 0": (["local", "-np", "0"], "-np must be >= 1"),
}


@pytest.mark.parametrize("case", sorted(LAUNCH_ERRORS))
def test_launcher_arguments_are_checked(case: str, tmp_path: Path) -> None:
    argv, message = LAUNCH_ERRORS[case]
    proc = subprocess.run(
        [sys.executable, "-m", "megdet_hpc.launch", *argv],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=HANG_GUARD,
    )
    assert proc.returncode == 2, proc.stderr
    prog = proc.stderr.strip().split(": error:")[0]
    assert message in one_line_error(proc, prog)
    assert not list(tmp_path.iterdir())
