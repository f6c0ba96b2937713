"""The batch rule, in one place: world size x images per GPU x gradient accumulation = total batch.

``solver.total_batch`` counts the images of one optimizer step over all ranks; one forward/backward
pass over all ranks sees ``per_pass`` = world x images per GPU of them, ``grad_accum`` passes a step.
``validate(cfg, world_size)``, ``engine.batch.plan_batch`` and the launchers all go through
``BatchPlan``: its ``total`` is the product, ``check`` the one-line error when a config disagrees.
"""

from __future__ import annotations

from dataclasses import dataclass

from megdet_hpc.config.errors import ConfigError


@dataclass(frozen=True)
class BatchPlan:
    """The batch layout of a job."""

    world: int
    images_per_gpu: int
    grad_accum: int = 1

    @property
    def per_pass(self) -> int:
        """Images of one forward/backward pass over all ranks (what the sampler draws at a time)."""
        return self.world * self.images_per_gpu

    @property
    def total(self) -> int:
        """Images per optimizer step over all ranks: ``solver.total_batch``."""
        return self.per_pass * self.grad_accum

    def check(self, total_batch: int) -> BatchPlan:
        """``self`` if it makes ``total_batch``; else a ConfigError naming the three factors."""
        if self.total != total_batch:
            raise ConfigError(
                f"solver.total_batch={total_batch} != world size {self.world} x data.images_per_gpu "
                f"{self.images_per_gpu} x solver.grad_accum {self.grad_accum} = {self.total}"
            )
        return self

    def keeping(self, total_batch: int) -> BatchPlan | None:
        """The layout on this world size that makes ``total_batch``: the same images per GPU with
        another accumulation if that divides, else one pass of ``total_batch / world`` per GPU;
        None when the world size does not divide ``total_batch``."""
        if total_batch == self.total:
            return self
        if total_batch % self.per_pass == 0:
            return BatchPlan(self.world, self.images_per_gpu, total_batch // self.per_pass)
        if total_batch % self.world == 0:
            return BatchPlan(self.world, total_batch // self.world, 1)
        return None
