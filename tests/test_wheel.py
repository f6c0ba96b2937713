"""The package as a cluster installs it: a wheel in a fresh venv, used from outside the checkout.

The venv reuses the installed dependencies (a ``.pth`` line naming this environment's site-packages,
read after the venv's own, so the wheel's ``megdet_hpc`` -- not the editable checkout -- is imported:
``.pth`` files in that directory, like the editable install's, are not processed).
"""

from __future__ import annotations

import pkgutil
import site
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
MODULE_MAINS = [
    "megdet_hpc.train",
    "megdet_hpc.evaluate",
    "megdet_hpc.visualize",
    "megdet_hpc.launch",
    "megdet_hpc.plan",
    "megdet_hpc.perf.calibrate",
    "megdet_hpc.data.synthetic",
    "megdet_hpc.solver.schedule",
    "megdet_hpc.engine.report",
    "megdet_hpc.experiments.megdet_table",
    "megdet_hpc.experiments.parity",
]
CONSOLE_SCRIPTS = ["megdet-train", "megdet-evaluate", "megdet-launch", "megdet-plan", "megdet-visualize"]


@pytest.fixture(scope="module")
def fresh_venv(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    tmp = tmp_path_factory.mktemp("wheel")
    dist = tmp / "dist"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(dist),
            str(REPO),
        ],
        check=True,
        cwd=tmp,
        capture_output=True,
        timeout=600,
    )
    (wheel,) = dist.glob("megdet_hpc-*.whl")
    venv = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    py = venv / "bin" / "python"
    subprocess.run(
        [str(py), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    purelib = subprocess.run(
        [str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    Path(purelib, "zz_megdet_test_deps.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    return wheel, venv


def test_the_wheel_holds_every_package_and_the_data_files(fresh_venv) -> None:
    wheel, _ = fresh_venv
    names = set(zipfile.ZipFile(wheel).namelist())
    packages = {str(p.relative_to(REPO)) for p in (REPO / "megdet_hpc").rglob("*.py")}
    assert packages <= names, sorted(packages - names)
    assert (
        "megdet_hpc/data/__init__.py" in names and "megdet_hpc/launch/templates/train.sbatch.sh.in" in names
    )
    configs = {f"megdet_hpc/configs/{p.name}" for p in (REPO / "configs").glob("*.yaml")}
    assert configs <= names, sorted(configs - names)


def test_every_module_imports_from_the_installed_wheel(fresh_venv, tmp_path: Path) -> None:
    _, venv = fresh_venv
    modules = sorted(m.name for m in pkgutil.walk_packages([str(REPO / "megdet_hpc")], prefix="megdet_hpc."))
    code = (
        "import importlib, sys, megdet_hpc\n"
        f"assert megdet_hpc.__file__.startswith({str(venv)!r}), megdet_hpc.__file__\n"
        f"for name in {modules!r}:\n"
        "    importlib.import_module(name)\n"
        "print(len(sys.modules))\n"
    )
    proc = subprocess.run(
        [str(venv / "bin/python"), "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_two_iterations_on_the_embedded_data_from_outside_the_checkout(fresh_venv, tmp_path: Path) -> None:
    _, venv = fresh_venv
    py = str(venv / "bin/python")
    subprocess.run(
        [
            py,
            "-m",
            "megdet_hpc.data.synthetic",
            "--out",
            "data",
            "--train",
            "16",
            "--val",
            "4",
            "--size",
            "64",
        ],
        cwd=tmp_path,
        check=True,
        capture_output=True,
        timeout=300,
    )
    overrides = [
        "model.min_size=64",
        "model.max_size=64",
        "model.anchor_sizes=[8,16,32,64,128]",
        "solver.max_iter=2",
        "solver.total_batch=2",
        "data.num_workers=0",
        "train.output_dir=out",
        "eval.max_images=2",
        "eval.vis_images=1",
    ]
    # The bundled config, by its repository path: the wheel carries configs/.
    proc = subprocess.run(
        [
            str(venv / "bin/megdet-train"),
            "--config",
            "configs/demo_cpu.yaml",
            *overrides,
            "data.train_images=data/train",
            "data.train_annotations=data/annotations/instances_train.json",
            "data.val_images=data/val",
            "data.val_annotations=data/annotations/instances_val.json",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert (tmp_path / "out/model_0000002.pth").exists() and (tmp_path / "out/eval/metrics.json").exists()


@pytest.mark.parametrize(
    "entry", MODULE_MAINS + CONSOLE_SCRIPTS + ["megdet_hpc.launch sbatch", "megdet_hpc.launch local"]
)
def test_every_entry_point_answers_help(fresh_venv, tmp_path: Path, entry: str) -> None:
    _, venv = fresh_venv
    if entry.startswith("megdet-"):
        argv = [str(venv / "bin" / entry)]
    else:
        module, *sub = entry.split()
        argv = [str(venv / "bin/python"), "-m", module, *sub]
    proc = subprocess.run([*argv, "--help"], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "usage:" in proc.stdout, proc.stderr[-2000:]
