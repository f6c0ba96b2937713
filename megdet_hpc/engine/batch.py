"""Batch arithmetic for a job: world size x images per GPU x accumulation = total batch."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from megdet_hpc.config import ConfigError

log = logging.getLogger("megdet_hpc.engine")


@dataclass(frozen=True)
class BatchPlan:
    world: int
    images_per_gpu: int
    grad_accum: int

    @property
    def total(self) -> int:
        return self.world * self.images_per_gpu * self.grad_accum


def plan_batch(
    world: int,
    images_per_gpu: int,
    grad_accum: int,
    total: int,
    resuming_from: int | None,
    announce: bool = True,
) -> BatchPlan:
    """The batch layout for this job.

    Fresh start: the config must be consistent (one-line error otherwise).  Resuming a checkpoint
    written with another world size: keep the checkpoint's total batch by changing gradient
    accumulation, else images per GPU; when neither divides, keep the per-GPU layout and let the
    linear scaling rule rescale the LR (``LRSchedule.lr`` takes the actual total batch) -- and say so,
    once per job: every rank computes the same plan, only the one with ``announce`` (rank 0) logs it.
    """
    say = log.warning if announce else log.debug
    plan = BatchPlan(world, images_per_gpu, grad_accum)
    if resuming_from is None:
        if plan.total != total:
            raise ConfigError(
                f"solver.total_batch={total} != world size {world} x data.images_per_gpu {images_per_gpu}"
                f" x solver.grad_accum {grad_accum} = {plan.total}"
            )
        return plan
    target = resuming_from
    if plan.total == target:
        return plan
    if target % (world * images_per_gpu) == 0:
        new = BatchPlan(world, images_per_gpu, target // (world * images_per_gpu))
        say(
            "world size %d: keeping the total batch %d with grad_accum %d (was %d)",
            world,
            target,
            new.grad_accum,
            grad_accum,
        )
        return new
    if target % world == 0:
        new = BatchPlan(world, target // world, 1)
        say(
            "world size %d: keeping the total batch %d with images_per_gpu %d (was %d)",
            world,
            target,
            new.images_per_gpu,
            images_per_gpu,
        )
        return new
    say(
        "world size %d cannot keep the total batch %d; continuing with %d and the LR rescaled "
        "by the linear rule (x%.3f)",
        world,
        target,
        plan.total,
        plan.total / target,
    )
    return plan
