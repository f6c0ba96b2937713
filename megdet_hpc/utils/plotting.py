"""matplotlib for the project's PNG plots: a headless backend and one way to write a figure.

Why one place: every plot is written from training ranks, experiment runners and CLIs on machines with no
display, so the backend must be Agg before pyplot is imported (and pyplot is imported lazily: matplotlib
costs ~1.5 s of CPU, which a run that writes no plot must not pay); and every figure is written the same
way -- laid out, its folder created, closed so a long run's figures do not accumulate.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def pyplot() -> Any:
    """``matplotlib.pyplot`` on the Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save(fig: Any, path: Path, **savefig: Any) -> Path:
    """Lay ``fig`` out, write it to ``path`` (its folder created; 110 dpi unless given) and close it."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, **{"dpi": 110, **savefig})
    plt.close(fig)
    return path
