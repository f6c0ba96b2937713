"""The batch layout of a job, fresh or resumed on another world size (the rule: ``config.BatchPlan``)."""

from __future__ import annotations

import logging

from megdet_hpc.config.batch import BatchPlan

__all__ = ["BatchPlan", "plan_batch"]

log = logging.getLogger("megdet_hpc.engine")


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
        return plan.check(total)
    target = resuming_from
    new = plan.keeping(target)
    if new == plan:
        return plan
    if new is not None and new.images_per_gpu == images_per_gpu:
        say(
            "world size %d: keeping the total batch %d with grad_accum %d (was %d)",
            world,
            target,
            new.grad_accum,
            grad_accum,
        )
        return new
    if new is not None:
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
