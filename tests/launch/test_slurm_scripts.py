"""The sbatch generator: golden committed scripts, quoting, bash -n and sbatch --test-only."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from megdet_hpc.launch.sbatch import COMMITTED, ScriptError, SlurmJob, render
from megdet_hpc.launch.sbatch import main as slurm_main

REPO = Path(__file__).resolve().parents[2]


def test_committed_scripts_are_current() -> None:
    """Like submitit's golden sbatch test: regenerate and compare (make slurm-scripts fixes it)."""
    assert slurm_main(["--check-committed"]) == 0
    for gpus in COMMITTED:
        assert (REPO / f"slurm/train_{gpus}gpu.sh").exists()


@pytest.mark.parametrize("gpus", COMMITTED)
def test_committed_scripts_are_valid_bash(gpus: int) -> None:
    path = REPO / f"slurm/train_{gpus}gpu.sh"
    assert subprocess.run(["bash", "-n", str(path)]).returncode == 0
    text = path.read_text()
    nodes = max(1, gpus // 8)
    assert f"#SBATCH --nodes={nodes}\n" in text and f"--ntasks-per-node={min(gpus, 8)}\n" in text
    assert "#SBATCH --requeue" in text and "#SBATCH --signal=USR2@120" in text
    assert "#SBATCH --open-mode=append" in text and "--output=%x-%j.out" in text
    assert f"--total-batch {2 * gpus}" in text


def test_bad_parameters_are_one_line_errors(capsys: pytest.CaptureFixture[str]) -> None:
    assert slurm_main(["--gpus", "12", "--gpus-per-node", "8"]) == 2
    assert "not a multiple" in capsys.readouterr().err
    assert slurm_main(["--gpus", "2", "--time", "soon"]) == 2
    assert "--time 'soon'" in capsys.readouterr().err
    with pytest.raises(ScriptError, match="control character"):
        render(SlurmJob(gpus=1, job_name="a\nrm -rf /"))


def test_out_refuses_to_overwrite(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    target = tmp_path / "job.sh"
    target.write_text("keep me")
    assert slurm_main(["--gpus", "2", "--out", str(target)]) == 2
    assert target.read_text() == "keep me" and "exists" in capsys.readouterr().err


def test_hostile_values_are_data_not_code(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    evil = f"x $(touch {marker}) `touch {marker}` \"q' ; touch {marker}"
    text = render(SlurmJob(gpus=2, gpus_per_node=0, job_name=evil, config=evil, output_dir=evil))
    script = tmp_path / "job.sh"
    script.write_text(text)
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    # Run the script's variable section for real (everything before the launch).
    head = text.split("set +e")[0] + 'printf "%s\\n" "$CONFIG" "$OUTPUT_DIR"\n'
    out = subprocess.run(
        ["bash", "-c", head.replace('mkdir -p "$OUTPUT_DIR"', "")],
        capture_output=True,
        text=True,
        env={"SLURM_JOB_ID": "1", "SLURM_JOB_NODELIST": "n", "PATH": "/usr/bin:/bin"},
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines()[-2:] == [evil, evil]
    assert not marker.exists()


def test_sbatch_test_only_accepts_cpu_script(slurm_cluster: Path, tmp_path: Path) -> None:
    assert shutil.which("sbatch")
    script = tmp_path / "cpu.sh"
    script.write_text(
        render(
            SlurmJob(
                gpus=2,
                gpus_per_node=0,
                cpus_per_task=1,
                time="00:10:00",
                job_name="cpu test",
                partition="low",
            )
        )
    )
    ok = subprocess.run(["sbatch", "--test-only", str(script)], capture_output=True, text=True, cwd=tmp_path)
    assert ok.returncode == 0 and "to start at" in ok.stderr, ok.stderr
    # The GPU scripts parse; this CPU-only cluster just cannot satisfy them.
    gpu = subprocess.run(
        ["sbatch", "--test-only", str(REPO / "slurm/train_8gpu.sh")],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert gpu.returncode != 0 and "error" in gpu.stderr.lower() and "line" not in gpu.stderr.lower()
