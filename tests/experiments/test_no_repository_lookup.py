"""The installed package never looks for the repository: the experiments write under the current
directory (or ``--results``), take the bundled config, and provenance reads the commit of the
checkout they run in -- "unknown", and no crash, outside one."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from megdet_hpc.utils.provenance import environment, git_commit


def test_commit_of_the_current_directory_or_unknown(tmp_path: Path, monkeypatch) -> None:
    assert git_commit(tmp_path / "missing") == "unknown"
    monkeypatch.chdir(tmp_path)
    assert git_commit() == "unknown" and environment()["commit"] == "unknown"
    repo = tmp_path / "checkout"
    repo.mkdir()
    git = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run([*git, "init", "-q"], check=True)
    (repo / "f").write_text("1")
    subprocess.run([*git, "add", "f"], check=True)
    subprocess.run([*git, "commit", "-qm", "c"], check=True)
    head = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    assert git_commit(repo) == head
    (repo / "f").write_text("2")
    monkeypatch.chdir(repo)
    assert git_commit() == environment()["commit"] == head + "+dirty"


@pytest.mark.filterwarnings("ignore:No artists with labels")  # nothing has run: empty plots
def test_megdet_table_writes_under_the_current_directory(tmp_path: Path, monkeypatch) -> None:
    from megdet_hpc.experiments import megdet_table

    monkeypatch.chdir(tmp_path)
    assert megdet_table.main(["--report-only", "--data", str(tmp_path / "none")]) == 0
    doc = json.loads((tmp_path / "experiments" / "results" / "megdet_table.json").read_text())
    assert doc["env"]["commit"] == "unknown" and {r["status"] for r in doc["runs"]} == {"pending"}
