"""Metrics on rank 0: JSONL (machine-readable), TensorBoard, and a PNG of loss and LR curves."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


class MetricsWriter:
    """Writes nothing until the first record: a run refused while resuming (weights of another
    model, say) leaves no TensorBoard file behind."""

    def __init__(self, output_dir: Path, enabled: bool, tensorboard: bool = True) -> None:
        self.enabled = enabled
        self.output_dir = output_dir
        self.path = output_dir / "metrics.jsonl"
        self.records: list[dict[str, Any]] = []
        self._tensorboard = enabled and tensorboard
        self._tb = None
        self._dir_made = False

    def _make_dir(self) -> None:
        if not self._dir_made:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            self._dir_made = True

    def _board(self) -> Any:
        """The TensorBoard writer, opened at the first record (None without tensorboard)."""
        if self._tensorboard and self._tb is None:
            self._tensorboard = False  # one try
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(self.output_dir / "tensorboard"))
            except ImportError:  # tensorboard is optional outside the project venv
                self._tb = None
        return self._tb

    def load_history(self, records: list[dict[str, Any]]) -> None:
        """Metrics so far, restored from a checkpoint (the JSONL may hold lines past it: rewrite)."""
        self.records = list(records)
        if self.enabled:
            self._make_dir()
            self.path.write_text("".join(json.dumps(r) + "\n" for r in self.records))

    def write(self, record: dict[str, Any]) -> None:
        self.records.append(record)
        if not self.enabled:
            return
        self._make_dir()
        with open(self.path, "a") as fh:
            fh.write(json.dumps(record) + "\n")
        board = self._board()
        if board is not None:
            step = int(record.get("iteration", 0))
            for key, value in record.items():
                if key != "iteration" and isinstance(value, (int, float)):
                    board.add_scalar(key, value, step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None

    def plot(self, path: Path) -> Path | None:
        rows = [r for r in self.records if "loss" in r]
        if not self.enabled or not rows:
            return None
        from megdet_hpc.utils.plotting import pyplot, save

        plt = pyplot()

        its = [r["iteration"] for r in rows]
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 3.8))
        for key in sorted(k for k in rows[0] if k.startswith("loss")):
            ax1.plot(its, [r.get(key, float("nan")) for r in rows], label=key)
        ax1.set_yscale("log")
        ax1.set_xlabel("iteration")
        ax1.set_title("training losses")
        ax1.legend(fontsize=7)
        ax2.plot(its, [r["lr"] for r in rows])
        ax2.set_xlabel("iteration")
        ax2.set_title("learning rate")
        evals = [r for r in self.records if "AP50" in r]
        if evals:
            ax3 = ax2.twinx()
            ax3.plot([r["iteration"] for r in evals], [r["AP50"] for r in evals], "o-", color="C3")
            ax3.set_ylabel("val AP50", color="C3")
        return save(fig, path)
