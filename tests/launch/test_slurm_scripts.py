"""The sbatch generator: golden committed scripts, quoting, bash -n and sbatch --test-only."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from megdet_hpc.launch.__main__ import submitit_parser
from megdet_hpc.launch.resources import ResourceError, SlurmResources, from_arguments, slurm_time_minutes
from megdet_hpc.launch.sbatch import COMMITTED, SlurmJob, build_parser, render
from megdet_hpc.launch.sbatch import main as slurm_main

REPO = Path(__file__).resolve().parents[2]


def test_committed_scripts_are_current(monkeypatch: pytest.MonkeyPatch) -> None:
    """Like submitit's golden sbatch test: regenerate and compare (make slurm-scripts fixes it)."""
    monkeypatch.chdir(REPO)
    assert slurm_main(["--check-committed"]) == 0
    for gpus in COMMITTED:
        assert (REPO / f"slurm/train_{gpus}gpu.sh").exists()


def test_regenerate_needs_a_checkout(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The installed package never looks for the repository: ./slurm and ./configs of the cwd."""
    monkeypatch.chdir(tmp_path)
    assert slurm_main(["--regenerate-committed"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no ./slurm here" in err
    (tmp_path / "slurm").mkdir()
    assert slurm_main(["--check-committed"]) == 2
    assert "configs/megdet_r50_fpn_bs16.yaml" in capsys.readouterr().err
    (tmp_path / "configs").mkdir()
    for name in ("megdet_r50_fpn_bs16.yaml", "megdet_r50_fpn_bs256.yaml"):
        (tmp_path / "configs" / name).write_text("")
    assert slurm_main(["--check-committed"]) == 1  # stale: nothing there yet
    assert slurm_main(["--regenerate-committed"]) == 0
    assert slurm_main(["--check-committed"]) == 0
    for gpus in COMMITTED:
        name = f"slurm/train_{gpus}gpu.sh"
        assert (tmp_path / name).read_text() == (REPO / name).read_text()


def test_sbatch_and_submitit_share_flags_and_rules() -> None:
    """One SlurmResources from the same flags; the same error for the same mistake."""
    argv = ["--gpus", "32", "--gpus-per-node", "8", "--time", "12:00:00", "--signal-lead", "90"]
    a = from_arguments(build_parser().parse(argv))
    b = from_arguments(submitit_parser().parse(argv))
    assert (
        a
        == b
        == SlurmResources(
            nodes=4, tasks_per_node=8, time="12:00:00", signal_lead_s=90, job_name="megdet-32gpu"
        )
    )
    assert from_arguments(submitit_parser().parse(["--nodes", "4"])) == a.__class__(
        nodes=4, tasks_per_node=8, job_name="megdet-32gpu"
    )
    # the old submitit spellings: minutes and seconds, same fields
    old = from_arguments(
        submitit_parser().parse(["--nodes", "4", "--timeout", "720", "--signal-delay", "90"])
    )
    assert (old.time_minutes, old.signal_lead_s) == (720, 90)
    for bad, message in [
        (["--cpus-per-task", "0"], "--cpus-per-task must be >= 1, got 0"),
        (["--signal-lead", "-5"], "--signal-lead must be >= 0 seconds, got -5"),
        (["--time", "soon"], "--time 'soon' is not a Slurm time"),
        (["--time", "0"], "--time '0' is under a minute"),
        (["--nodes", "0"], "--nodes must be >= 1, got 0"),
        (["--gpus", "12"], "--gpus 12 is not a multiple of --gpus-per-node 8"),
        (["--gpus", "16", "--nodes", "3"], "--gpus 16 at --gpus-per-node 8 is 2 node(s), not --nodes 3"),
        (["--signal", "KILL"], "--signal must be USR1, USR2 or TERM, got 'KILL'"),
        (["--job-name", "a\nb"], "--job-name contains a control character"),
    ]:
        for parser in (build_parser(), submitit_parser()):
            with pytest.raises(ResourceError) as info:
                from_arguments(parser.parse(bad))
            assert str(info.value) == message or str(info.value).startswith(message), (bad, info.value)


@pytest.mark.parametrize(
    ("text", "minutes"),
    [("1440", 1440), ("30:30", 31), ("24:00:00", 1440), ("2-00:00:00", 2880), ("1-12", 2160), ("0-00:01", 1)],
)
def test_slurm_time_formats(text: str, minutes: int) -> None:
    assert slurm_time_minutes(text) == minutes


def test_cpu_tasks_and_small_jobs() -> None:
    assert SlurmResources.for_gpus(2, 0).validate().tasks == 2
    one = SlurmResources.for_gpus(4, 8).validate()
    assert (one.nodes, one.gpus_per_node, one.tasks_per_node, one.job_name) == (1, 4, 4, "megdet-4gpu")
    cpu = from_arguments(submitit_parser().parse(["--gpus-per-node", "0", "--tasks-per-node", "2"]))
    assert (cpu.nodes, cpu.tasks_per_node, cpu.tasks) == (1, 2, 2)
    with pytest.raises(ResourceError, match="one task per GPU"):
        render(SlurmJob(SlurmResources(gpus_per_node=8, tasks_per_node=2)))
    assert slurm_main(["--gpus", "2", "--launcher", "mpirun"]) == 2


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
    with pytest.raises(ResourceError, match="control character"):
        render(SlurmJob(SlurmResources.for_gpus(1, job_name="a\nrm -rf /")))


def test_out_refuses_to_overwrite(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    target = tmp_path / "job.sh"
    target.write_text("keep me")
    assert slurm_main(["--gpus", "2", "--out", str(target)]) == 2
    assert target.read_text() == "keep me" and "exists" in capsys.readouterr().err


def test_hostile_values_are_data_not_code(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    evil = f"x $(touch {marker}) `touch {marker}` \"q' ; touch {marker}"
    text = render(SlurmJob(SlurmResources.for_gpus(2, 0, job_name=evil), config=evil, output_dir=evil))
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
                SlurmResources.for_gpus(
                    2, 0, cpus_per_task=1, time="00:10:00", job_name="cpu test", partition="low"
                )
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
