"""The training loop and its hooks, in the shape of detectron2's ``engine/train_loop.py``.

``TrainerBase.train`` is a short loop: ``run_step`` then every hook's ``after_step``.  Policies --
checkpointing, evaluation, metrics and progress, the non-finite guard, preemption -- are hooks.

One difference from detectron2, and the reason for ``HookBase.vote_flags``: a multi-rank job must
take every decision on every rank at the same iteration (stop and checkpoint, skip a non-finite step),
and a collective per decision per step would cost latency on every step.  So each hook contributes
named booleans (``vote_flags``, asked after the step's backward passes, when its gradients are being
averaged), ``run_step`` reduces them together with the loss values and the non-finite flag in **one**
collective, and the hooks read the agreed values from the ``StepResult``.

Hooks are given what they need in their constructors (a checkpointer, an evaluation function, a
metrics writer, ...), not a trainer to reach into: ``self.trainer`` is only the loop (``iteration``,
``max_iter``, ``completed``).  A hook with state of its own (the non-finite streak) returns it from
``state_dict`` and the trainer's checkpoint carries it, as detectron2's ``TrainerBase.state_dict`` does.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from megdet_hpc.distributed.lost_peer import shield_teardown
from megdet_hpc.utils.cli import EXIT_OK

log = logging.getLogger("megdet_hpc.engine")


@dataclass(frozen=True)
class StepResult:
    """What one optimizer step did, identical on every rank."""

    iteration: int  # iterations completed, this step included
    images_seen: int
    lr: float
    losses: dict[str, float]  # each loss term, mean over ranks
    skipped: bool = False  # non-finite loss or gradient: weights, optimizer and BN buffers unchanged
    flags: dict[str, bool] = field(default_factory=dict)  # hook flags, True if any rank raised them

    @property
    def loss(self) -> float:
        return sum(self.losses.values())


class StopTraining(Exception):
    """Raised by a hook to end training with ``exit_code`` (preempted, aborted)."""

    def __init__(self, exit_code: int, message: str = "") -> None:
        super().__init__(message)
        self.exit_code = exit_code


class HookBase:
    """A training policy.  ``trainer`` (the loop: ``iteration``, ``max_iter``, ``completed``) is set
    when the hook is registered."""

    trainer: TrainerBase

    def before_train(self) -> None:
        """Once, before the first step."""

    def vote_flags(self) -> dict[str, bool]:
        """Flags this rank raises in the current step (asked after its backward passes); the step's
        single collective ORs them over ranks and ``after_step`` reads the agreed values."""
        return {}

    def after_step(self, result: StepResult) -> None:
        """After every step, with the agreed result."""

    def after_train(self) -> None:
        """Once, when training reached its last iteration (not after a stop)."""

    def close(self) -> None:
        """Always, last: release what ``before_train`` acquired."""

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint must carry for this hook to continue where it stopped (usually nothing)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what ``state_dict`` returned."""


class TrainerBase:
    """A loop over ``run_step`` with hooks; subclasses implement ``run_step`` and ``iteration``."""

    iteration: int
    max_iter: int

    def __init__(self) -> None:
        self._hooks: list[HookBase] = []
        self.completed = False

    def register_hooks(self, hooks: list[HookBase]) -> None:
        for hook in hooks:
            hook.trainer = self
            self._hooks.append(hook)

    def hooks_state_dict(self) -> dict[str, dict[str, Any]]:
        """Every hook's own state, by class name (hooks without state left out)."""
        states = {}
        for hook in self._hooks:
            state = hook.state_dict()
            if state:
                name = type(hook).__qualname__
                if name in states:
                    raise RuntimeError(f"two {name} hooks with state: a checkpoint cannot tell them apart")
                states[name] = state
        return states

    def load_hooks_state_dict(self, states: dict[str, dict[str, Any]]) -> None:
        for hook in self._hooks:
            state = states.get(type(hook).__qualname__)
            if state:
                hook.load_state_dict(state)

    def vote_flags(self) -> dict[str, bool]:
        flags: dict[str, bool] = {}
        for hook in self._hooks:
            for name, value in hook.vote_flags().items():
                if name in flags:
                    raise RuntimeError(f"two hooks vote on the flag {name!r}")
                flags[name] = bool(value)
        return flags

    def run_step(self) -> StepResult:
        raise NotImplementedError

    def train(self) -> int:
        """Run to ``max_iter``; returns the exit code (0, or the one a hook stopped with)."""
        code = EXIT_OK
        failure: BaseException | None = None
        try:
            for hook in self._hooks:
                hook.before_train()
            try:
                while self.iteration < self.max_iter:
                    result = self.run_step()
                    for hook in self._hooks:
                        hook.after_step(result)
                self.completed = True
                for hook in self._hooks:
                    hook.after_train()
            except StopTraining as stop:
                if str(stop):
                    log.error("%s", stop)
                code = stop.exit_code
        except BaseException as exc:
            failure = exc
            raise
        finally:
            for hook in reversed(self._hooks):
                hook.close()
            if failure is not None:
                shield_teardown(failure)
        return code
