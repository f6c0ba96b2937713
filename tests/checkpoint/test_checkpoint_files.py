"""Checkpoint files: atomic writes, manifests, fallback past corrupt files, kill -9 mid-save."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from megdet_hpc.checkpoint import Checkpointer, CheckpointError, load_file, verify, write_checkpoint
from megdet_hpc.checkpoint.io import POINTER
from megdet_hpc.distributed.single import SingleProcessComm

COMM = SingleProcessComm()


def state(value: float, numel: int = 10) -> dict:
    return {"model": {"w": torch.full((numel,), value)}, "iteration": int(value)}


def test_write_verify_load_and_pointer(tmp_path: Path) -> None:
    path = write_checkpoint(tmp_path, 5, state(5.0), {"iteration": 5})
    assert path.name == "model_0000005.pth" and (tmp_path / POINTER).read_text().strip() == path.name
    assert verify(path)["iteration"] == 5
    assert torch.equal(load_file(path)["model"]["w"], torch.full((10,), 5.0))
    assert not list(tmp_path.glob(".*tmp*"))


def test_fallback_past_truncated_and_garbage(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    for it in (2, 4, 6):
        write_checkpoint(tmp_path, it, state(float(it)), {"iteration": it})
    newest = tmp_path / "model_0000006.pth"
    newest.write_bytes(newest.read_bytes()[:50])  # truncated
    middle = tmp_path / "model_0000004.pth"
    middle.write_bytes(bytes(b ^ 0xFF for b in middle.read_bytes()))  # corrupted, same size
    ckpt = Checkpointer(tmp_path, COMM, keep=5, background=False)
    with caplog.at_level("WARNING"):
        chosen = ckpt.find_valid()
    assert chosen == tmp_path / "model_0000002.pth"
    assert "truncated" in caplog.text and "checksum mismatch" in caplog.text


def test_explicit_bad_checkpoint_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "x.pth").write_bytes(b"\x00" * 10)
    ckpt = Checkpointer(tmp_path / "out", COMM)
    with pytest.raises(CheckpointError, match=r"x.pth: cannot be loaded"):
        ckpt.find_valid(tmp_path / "x.pth")
    torch.save({"weights": 1}, tmp_path / "y.pth")
    with pytest.raises(CheckpointError, match="not a megdet_hpc checkpoint"):
        ckpt.find_valid(tmp_path / "y.pth")


def test_checkpoint_cannot_run_code(tmp_path: Path) -> None:
    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path}/pwned",))

    torch.save({"model": {}, "x": Evil()}, tmp_path / "model_0000001.pth")
    with pytest.raises(CheckpointError):
        load_file(tmp_path / "model_0000001.pth")
    assert not (tmp_path / "pwned").exists()


def test_keep_last_k_and_background_save(tmp_path: Path) -> None:
    ckpt = Checkpointer(tmp_path, COMM, keep=2, background=True)
    for it in range(1, 6):
        s = state(float(it))
        ckpt.save(it, s, {"iteration": it})
        s["model"]["w"].fill_(-1)  # training goes on mutating the live tensors
    ckpt.wait()
    names = sorted(p.name for p in tmp_path.glob("model_*.pth"))
    assert names == ["model_0000004.pth", "model_0000005.pth"]
    assert torch.equal(load_file(tmp_path / "model_0000005.pth")["model"]["w"], torch.full((10,), 5.0))


WRITER = """
import sys, torch
from pathlib import Path
from megdet_hpc.checkpoint import write_checkpoint
write_checkpoint(Path(sys.argv[1]), 9, {"model": {"w": torch.randn(150_000_000)}}, {"iteration": 9})
"""


def test_kill_9_during_save_keeps_previous(tmp_path: Path) -> None:
    write_checkpoint(tmp_path, 3, state(3.0), {"iteration": 3})
    repo = Path(__file__).resolve().parents[2]
    proc = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(tmp_path)], cwd=repo, env={**os.environ, "PYTHONPATH": str(repo)}
    )
    deadline = time.time() + 120
    while not list(tmp_path.glob(".model_0000009.pth.tmp-*")) and time.time() < deadline:
        time.sleep(0.02)
    assert list(tmp_path.glob(".model_0000009.pth.tmp-*")), "writer never started"
    time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert (tmp_path / POINTER).read_text().strip() == "model_0000003.pth"
    ckpt = Checkpointer(tmp_path, COMM)
    ckpt.open()  # takes the directory and cleans the dead writer's temp file
    assert not list(tmp_path.glob(".*tmp*"))
    assert ckpt.find_valid() == tmp_path / "model_0000003.pth"
    assert load_file(tmp_path / "model_0000003.pth")["iteration"] == 3
