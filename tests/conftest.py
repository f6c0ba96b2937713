"""Shared fixtures.  Multi-process tests launch real processes (horovodrun, mpirun, torchrun, sbatch)."""

from __future__ import annotations

import functools
import os
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
sys.path.insert(0, str(TESTS))

# Tests run the real launchers as root on a 2-core machine.
os.environ.setdefault("OMPI_ALLOW_RUN_AS_ROOT", "1")
os.environ.setdefault("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture
def repo_root() -> Path:
    return TESTS.parent


TINY_OVERRIDES = {
    "model": {
        "backbone": "resnet18",
        "num_classes": 3,
        "min_size": 64,
        "max_size": 64,
        "anchor_sizes": [8, 16, 32, 64, 128],
        "rpn_batch_size_per_image": 64,
        "rpn_pre_nms_top_n_train": 300,
        "rpn_post_nms_top_n_train": 200,
        "rpn_pre_nms_top_n_test": 200,
        "rpn_post_nms_top_n_test": 100,
        "box_batch_size_per_image": 32,
        "box_head_dim": 64,
        "roi_sampling_ratio": 1,
    },
    "solver": {
        "base_lr": 0.01,
        "base_batch": 2,
        "total_batch": 2,
        "warmup_iters": 2,
        "max_iter": 4,
        "steps": [3],
    },
    # No TensorBoard and no PNG plots (matplotlib: ~1.5 s of CPU per run): the tests that check them
    # turn them on.
    "train": {"threads": 1, "log_period": 1, "checkpoint_period": 2, "tensorboard": False, "plots": False},
    "eval": {"max_images": 4},
}


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small synthetic COCO dataset (64 px) shared by the engine tests."""
    from megdet_hpc.data.synthetic import generate

    return generate(tmp_path_factory.mktemp("data") / "synthetic", train=24, val=8, size=64, seed=1)


def write_tiny_config(folder: Path, tiny_data: Path, name: str = "tiny.yaml", **sections: dict) -> Path:
    """The tiny config YAML in ``folder`` (output dir ``folder/out``), sections updated by ``sections``."""
    import copy

    import yaml

    data = copy.deepcopy(TINY_OVERRIDES)
    data["data"] = {
        "train_images": str(tiny_data / "train"),
        "train_annotations": str(tiny_data / "annotations" / "instances_train.json"),
        "val_images": str(tiny_data / "val"),
        "val_annotations": str(tiny_data / "annotations" / "instances_val.json"),
        "images_per_gpu": 2,
        "num_workers": 0,
    }
    data["train"]["output_dir"] = str(folder / "out")
    for section, values in sections.items():
        data.setdefault(section, {}).update(values)
    path = folder / name
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture
def tiny_config(tmp_path: Path, tiny_data: Path):
    """Write a tiny config YAML (with extra overrides) and return its path."""

    def make(name: str = "tiny.yaml", **sections: dict) -> Path:
        return write_tiny_config(tmp_path, tiny_data, name, **sections)

    return make


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory: pytest.TempPathFactory):
    """A real single-node Slurm cluster (slurmctld + slurmd on 127.0.0.1) for the session."""
    import subprocess

    folder = tmp_path_factory.mktemp("slurm")
    script = TESTS.parent / "scripts" / "slurm_cluster.sh"
    subprocess.run(["bash", str(script), "start", str(folder)], check=True, capture_output=True, timeout=120)
    old = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = str(folder / "slurm.conf")
    try:
        yield folder
    finally:
        subprocess.run(["bash", str(script), "stop", str(folder)], capture_output=True, timeout=60)
        if old is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = old


@pytest.fixture(scope="session")
def multinode_cluster(tmp_path_factory: pytest.TempPathFactory):
    """A real 16-node Slurm cluster on this machine (one network/UTS/mount namespace per node, 8 fake
    GPUs each) for the session; see ``tests/multinode.py``.  Leaves ``os.environ`` alone."""
    import multinode

    cluster = multinode.start(tmp_path_factory.mktemp("slurm-nodes"))
    try:
        yield cluster
    finally:
        multinode.stop(cluster)


def _skip_gpu_tests_without_cuda(items: list) -> None:
    """GPU tests run where CUDA is: elsewhere (CI) they are skipped, and say why."""
    import torch

    if torch.cuda.is_available():
        return
    no_cuda = pytest.mark.skip(
        reason="needs a CUDA device (none here; run make test-gpu or bash bench/gpu.sh on a GPU)"
    )
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(no_cuda)


# What a run holds on disk at its peak (tiny trainings' checkpoints, ~120 MB each, and the Slurm
# clusters' state), with a margin; measured ~4 GiB with pytest's "failed" retention (pyproject.toml).
DISK_NEEDED_GIB = 8


def pytest_sessionstart(session: pytest.Session) -> None:
    """Refuse to start on a nearly full temp disk: the run would fail dozens of tests later, each with
    "no space left on device" (a CI run once did), and fill the disk for everything else."""
    if hasattr(session.config, "workerinput"):  # xdist workers: the controller checked
        return
    import shutil
    import tempfile

    root = Path(tempfile.gettempdir())
    free = shutil.disk_usage(root).free / 2**30
    if free < DISK_NEEDED_GIB:
        raise pytest.UsageError(
            f"only {free:.1f} GiB free in {root}; the tests need ~{DISK_NEEDED_GIB} GiB there "
            "(free some space, or point TMPDIR at a larger disk)"
        )


SLURM_MARKS = ("slurm_cluster", "multinode_cluster", "pytest.mark.slurm")


@functools.cache
def _needs_slurm(module: Path) -> bool:
    """Whether a test module uses a Slurm cluster (one of the session's fixtures, or the marker)."""
    try:
        text = module.read_text()
    except OSError:
        return False
    return any(mark in text for mark in SLURM_MARKS)


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log: object) -> object | None:
    """``pytest -n N`` (``make test``): whole modules spread over the workers, and every module that
    needs a Slurm cluster on one worker.

    Why: two one-node clusters would fight over ports 16817/16818 and a cluster start per worker costs
    what it saves, so the Slurm modules share the worker that started the session's clusters; a module
    stays whole so a module-scoped fixture (a reference run, a finished run) is built once.  (A custom
    scheduler, not ``xdist_group`` marks: pytest 9 ignores the node-id suffix xdist 3.8 groups by.)
    """
    if config.getvalue("dist") not in ("load", "loadscope", "loadfile", "loadgroup"):
        return None
    from xdist.scheduler import LoadScopeScheduling

    class ModulesSlurmTogether(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            module = nodeid.split("::", 1)[0]
            return "slurm" if _needs_slurm(config.rootpath / module) else module

    return ModulesSlurmTogether(config, log)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None):  # type: ignore[no-untyped-def]
    """``MEGDET_TEST_TIMELINE=FILE``: one JSON line per test (worker, start, end, set-up and teardown
    included), to see where a parallel run's minutes go (``python scripts/test_timeline.py FILE``)."""
    path = os.environ.get("MEGDET_TEST_TIMELINE")
    if not path:
        return (yield)
    import json
    import time

    start = time.time()
    try:
        return (yield)
    finally:
        record = {"worker": os.environ.get("PYTEST_XDIST_WORKER", "main"), "test": item.nodeid}
        with open(path, "a") as f:
            f.write(json.dumps({**record, "start": start, "end": time.time()}) + "\n")


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(session: pytest.Session, config: pytest.Config, items: list) -> None:
    """Fail the run when a ``test_*.py`` under a collected folder yields no test at all.

    Why: a folder named like one of pytest's default ``norecursedirs`` (``dist``, ``build``, ...) is
    skipped silently; the comm layer's tests once went unrun that way.  Runs before ``-k``/``-m``
    deselection, so selecting a subset does not trip it.
    """
    collected = {Path(str(item.path)).resolve() for item in items}
    roots = [Path(str(arg).split("::")[0]).resolve() for arg in config.args]
    on_disk = {p.resolve() for root in roots if root.is_dir() for p in root.rglob("test_*.py")}
    missing = sorted(str(p.relative_to(TESTS.parent)) for p in on_disk - collected)
    if missing:
        raise pytest.UsageError(f"test files on disk that pytest did not collect: {', '.join(missing)}")
    _skip_gpu_tests_without_cuda(items)
