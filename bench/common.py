"""Shared benchmark helpers: robust summaries, tables, results JSON with their environment, launches.

Benchmarks run as scripts (``python bench/x.py``) with ``megdet_hpc`` importable (installed by
``make setup``; ``bench/gpu.sh`` puts the checkout on ``PYTHONPATH``).  Multi-process contenders go
through ``megdet_hpc.launch.local.run_and_collect``: workers call ``write_report`` on rank 0.
"""

from __future__ import annotations

import atexit
import importlib.util
import json
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path
from types import ModuleType
from typing import Any

from megdet_hpc.launch.local import run_and_collect
from megdet_hpc.utils.provenance import environment

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"


def summary(samples: list[float]) -> dict[str, float]:
    """Median and interquartile spread: robust on a noisy machine."""
    s = sorted(samples)
    q = statistics.quantiles(s, n=4) if len(s) >= 2 else [s[0]] * 3
    return {"median": statistics.median(s), "p25": q[0], "p75": q[2], "n": len(s)}


def table(rows: list[dict[str, Any]], columns: list[tuple[str, str]]) -> str:
    header = [title for _, title in columns]
    body = [[_fmt(r.get(key)) for key, _ in columns] for r in rows]
    widths = [max(len(h), *(len(b[i]) for b in body)) if body else len(h) for i, h in enumerate(header)]
    line = "  ".join(h.ljust(w) for h, w in zip(header, widths))
    sep = "  ".join("-" * w for w in widths)
    return "\n".join([line, sep, *("  ".join(c.ljust(w) for c, w in zip(b, widths)) for b in body)])


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
    return "-" if v is None else str(v)


def write_result(name: str, payload: dict[str, Any], folder: Path = RESULTS) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    payload = {"benchmark": name, "time": time.strftime("%Y-%m-%dT%H:%M:%S"), "env": environment(), **payload}
    path = folder / f"{name}.json"
    path.write_text(json.dumps(payload, indent=2))
    return path


def collect(
    launcher: str, nproc: int, argv: list[str], env: dict[str, str] | None = None, timeout: float = 1800
) -> dict:
    """Rank 0's report of ``python argv`` run under ``launcher`` (see ``write_report``)."""
    return run_and_collect(launcher, nproc, argv, env=env, cwd=REPO, timeout=timeout).reports[0]


def bn_shapes(height: int, width: int, images: int = 2) -> list[tuple[int, ...]]:
    """Input shapes of every BatchNorm2d of torchvision's ResNet-50 (the FPN backbone's body)."""
    import torch
    import torchvision
    from torch import nn

    model = torchvision.models.resnet50(weights=None).eval()
    shapes: list[tuple[int, ...]] = []
    hooks = [
        m.register_forward_pre_hook(lambda _m, a: shapes.append(tuple(a[0].shape)))
        for m in model.modules()
        if isinstance(m, nn.BatchNorm2d)
    ]
    with torch.no_grad():
        model(torch.zeros(1, 3, height, width))
    for h in hooks:
        h.remove()
    return [(images, *s[1:]) for s in shapes]


def new_figure(figsize: tuple[float, float]) -> tuple[Any, Any]:
    """A headless matplotlib figure and axes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=figsize)


def savefig(fig: Any, name: str, folder: Path = RESULTS) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.png"
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def layer_module_at(rev: str) -> ModuleType:
    """``megdet_hpc/layers/cgbn.py`` as it was at git revision ``rev``, imported beside today's package:
    benchmarks put an old layer next to the current one in the same process."""
    source = subprocess.run(
        ["git", "show", f"{rev}:megdet_hpc/layers/cgbn.py"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    source = source.replace(
        "from megdet_hpc.dist import", "from megdet_hpc.distributed import"
    )  # renamed since
    path = Path(tempfile.mkdtemp()) / f"cgbn_{rev}.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location(f"cgbn_{rev}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def timing_run(config: str | Path, overrides: list[str], comm: Any = None) -> Any:
    """A ``TrainingRun`` ready to time ``run.trainer.run_step``: a fresh temporary output dir, no
    checkpoints, no evaluation, no TensorBoard (what the benchmarks measure)."""
    from megdet_hpc import distributed
    from megdet_hpc.config import load_config
    from megdet_hpc.engine.defaults import build_run, configure_process
    from megdet_hpc.perf.calibrate import TIMING_OVERRIDES

    out = tempfile.mkdtemp(prefix="megdet-timing-")
    atexit.register(shutil.rmtree, out, ignore_errors=True)  # a lock file, nothing to keep
    cfg = load_config(config, [*overrides, *TIMING_OVERRIDES, f"train.output_dir={out}"])
    run = build_run(cfg, comm or distributed.init(), resume=False)
    configure_process(run.cfg, run.device)  # what training would set (a benchmark may switch per contender)
    return run
