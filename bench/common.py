"""Shared benchmark helpers: robust timing summaries, tables, JSON results, launcher runs."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"
sys.path.insert(0, str(REPO))

from megdet_hpc.launch.local import local_command, local_env  # noqa: E402


def summary(samples: list[float]) -> dict[str, float]:
    """Median and interquartile spread: robust on a noisy 2-core machine."""
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


def write_result(name: str, payload: dict[str, Any]) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    payload = {"benchmark": name, "time": time.strftime("%Y-%m-%dT%H:%M:%S"), "host_cpus": os.cpu_count(),
               **payload}  # fmt: skip
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(payload, indent=2))
    return path


def launch(launcher: str, nproc: int, argv: list[str], env: dict[str, str] | None = None,
           timeout: float = 900) -> subprocess.CompletedProcess[str]:  # fmt: skip
    full = local_env(launcher, env, pythonpath=str(REPO))
    proc = subprocess.run(local_command(launcher, nproc, argv), env=full, cwd=REPO, capture_output=True,
                          text=True, timeout=timeout)  # fmt: skip
    if proc.returncode != 0:
        raise RuntimeError(f"{launcher} -np {nproc} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc


def new_figure(figsize: tuple[float, float]) -> tuple[Any, Any]:
    """A headless matplotlib figure and axes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=figsize)


def savefig(fig: Any, name: str) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.png"
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path
