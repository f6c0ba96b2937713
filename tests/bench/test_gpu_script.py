"""``bash bench/gpu.sh`` only ever runs on a lent GPU machine; CI has none.  Its ``--smoke`` mode runs
every section of ``bench/gpu.py`` on the CPU at toy sizes, so the script itself (imports, contenders,
2-rank worker, tables, JSON) is exercised here and a GPU session spends its minutes measuring."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_gpu_benchmark_script_runs_every_section(tmp_path: Path) -> None:
    env = {
        **os.environ,
        "OUT": str(tmp_path),
        "OMP_NUM_THREADS": "1",
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
    }
    proc = subprocess.run(
        [sys.executable, "bench/gpu.py", "--smoke"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((tmp_path / "gpu.json").read_text())
    assert result["smoke"] and result["env"]["commit"]
    assert {r["contender"] for r in result["bn"]} == {"nn.BatchNorm2d", "CGBN portable", "CGBN fused"}
    assert all(r["sync_free"] for r in result["sync_free"])
    assert result["two_ranks"][0]["contender"] == "CGBN"
    contenders = {r["contender"] for r in result["step"]}
    assert {
        "SimpleTrainer.run_step",
        "plain AMP loop, same model",
        "torchvision fasterrcnn_resnet50_fpn loop",
        "SimpleTrainer.run_step, CGBN forced",
        "SimpleTrainer.run_step, nn.BatchNorm2d",
    } == contenders
    assert {r["checkpointing"] for r in result["memory"]} == {"none", "ResNet stages", "stages + FPN"}
