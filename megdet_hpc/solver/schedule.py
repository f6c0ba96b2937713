"""MegDet's learning-rate policy as a pure function of the number of images seen.

lr = base_lr * total_batch / base_batch (the linear scaling rule), ramped linearly from
``warmup_factor * lr`` over the warmup, then multiplied by ``gamma`` at each step.  Warmup and steps
are configured in iterations at the configured total batch (the familiar unit) but evaluated in
*images*, so a resumed job -- even on another GPU count with another total batch -- continues the
same curve from where it stopped (torchvision's reference loses warmup on resume; mmengine refuses a
different world size).
"""

from __future__ import annotations

import bisect
import sys
from dataclasses import dataclass
from pathlib import Path

from megdet_hpc.config import Config, load_config
from megdet_hpc.utils.cli import ArgumentParser, run_cli


@dataclass(frozen=True)
class LRSchedule:
    base_lr: float
    base_batch: int
    reference_batch: int  # the total batch the iteration counts below are written for
    warmup_factor: float
    warmup_images: int
    step_images: tuple[int, ...]
    gamma: float
    max_images: int

    @classmethod
    def from_config(cls, cfg: Config) -> LRSchedule:
        s = cfg.solver
        return cls(
            base_lr=s.base_lr,
            base_batch=s.base_batch,
            reference_batch=s.total_batch,
            warmup_factor=s.warmup_factor,
            warmup_images=s.warmup_iters * s.total_batch,
            step_images=tuple(step * s.total_batch for step in s.steps),
            gamma=s.gamma,
            max_images=s.max_iter * s.total_batch,
        )

    def lr(self, images_seen: int, total_batch: int | None = None) -> float:
        """LR for the step that starts after ``images_seen`` images, at ``total_batch`` per step."""
        batch = total_batch or self.reference_batch
        peak = self.base_lr * batch / self.base_batch
        decay = self.gamma ** bisect.bisect_right(self.step_images, images_seen)
        if images_seen < self.warmup_images:
            alpha = images_seen / self.warmup_images
            return peak * decay * (self.warmup_factor * (1 - alpha) + alpha)
        return peak * decay


def plot_schedule(schedule: LRSchedule, path: Path, points: int = 400) -> Path:
    from megdet_hpc.utils.plotting import pyplot, save

    plt = pyplot()

    xs = [int(schedule.max_images * i / points) for i in range(points + 1)]
    ys = [schedule.lr(x) for x in xs]
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.plot([x / schedule.reference_batch for x in xs], ys)
    ax.set_xlabel(f"iteration (total batch {schedule.reference_batch})")
    ax.set_ylabel("learning rate")
    ax.set_title("MegDet LR policy: linear scaling + warmup + steps")
    ax.grid(alpha=0.3)
    return save(fig, path)


def main(argv: list[str] | None = None) -> int:
    """``python -m megdet_hpc.solver.schedule --config C --out lr.png``: plot the configured schedule."""
    p = ArgumentParser(
        prog="megdet_hpc.solver.schedule", description="Plot the LR schedule of a config to PNG"
    )
    p.add_argument("--config", required=True)
    p.add_argument("--out", default="lr_schedule.png", type=Path)
    p.add_argument("opts", nargs="*", help="overrides section.key=value")
    a = p.parse(argv)

    def _run() -> int:
        sched = LRSchedule.from_config(load_config(a.config, a.opts))
        print(f"peak lr {sched.lr(sched.warmup_images):.5g}; wrote {plot_schedule(sched, a.out)}")
        return 0

    return run_cli(_run, "megdet_hpc.solver.schedule")


if __name__ == "__main__":
    sys.exit(main())
