"""``SimpleTrainer`` built in-process from explicit parts -- model, gradient sync + optimizer, loader
and sampler, schedule, comm, batch layout -- with no config object, no output directory, no hooks:
one step moves the weights, a skipped step moves nothing, and a step resumed from ``state_dict`` into
freshly built parts is bit-identical to the uninterrupted one."""

from __future__ import annotations

import copy
from pathlib import Path

import torch

from megdet_hpc.checkpoint import rng as rng_state
from megdet_hpc.config import load_config
from megdet_hpc.data.loader import build_train_dataset, build_train_loader
from megdet_hpc.distributed.grad_sync import make_gradient_sync
from megdet_hpc.distributed.single import SingleProcessComm
from megdet_hpc.engine.batch import BatchPlan
from megdet_hpc.engine.step import SimpleTrainer
from megdet_hpc.modeling import build_model
from megdet_hpc.solver import LRSchedule, build_optimizer


def parts(config: Path) -> SimpleTrainer:
    cfg = load_config(config)
    comm = SingleProcessComm()
    rng_state.seed_all(0)
    model = build_model(cfg)
    sync = make_gradient_sync(comm, model, build_optimizer(cfg, model))
    loader, sampler = build_train_loader(cfg, build_train_dataset(cfg), 0, 1, torch.device("cpu"))
    return SimpleTrainer(
        model,
        sync,
        loader,
        sampler,
        LRSchedule.from_config(cfg),
        comm,
        BatchPlan(world=1, images_per_gpu=2, grad_accum=1),
        max_iter=3,
        device=torch.device("cpu"),
        sampling_seed=0,
    )


def weights(trainer: SimpleTrainer) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}


def test_a_step_from_explicit_parts_and_a_bit_identical_resume(tiny_config) -> None:
    config = tiny_config()
    a = parts(config)
    before = weights(a)
    first = a.run_step()
    assert first.iteration == 1 and first.images_seen == 2 and not first.skipped
    assert set(first.losses) >= {"loss_classifier", "loss_objectness"} and first.loss > 0
    moved = weights(a)
    assert any(not torch.equal(before[k], moved[k]) for k in before)
    state, rngs = (
        copy.deepcopy(a.state_dict()),
        rng_state.capture(),
    )  # live tensors: copy, as a checkpoint does
    second = a.run_step()
    expected = weights(a)
    a.close()

    b = parts(config)  # freshly built parts, then the state after step 1
    b.load_state_dict(state)
    rng_state.restore(rngs)
    assert b.iteration == 1 and b.progress.images_seen == 2
    again = b.run_step()
    assert again.losses == second.losses and again.lr == second.lr
    got = weights(b)
    assert all(torch.equal(got[k], expected[k]) for k in expected)
    b.close()


def test_a_non_finite_step_changes_nothing(tiny_config) -> None:
    t = parts(tiny_config())
    before = weights(t)
    hook = next(t.model.parameters()).register_hook(lambda g: g * float("nan"))
    t.clip_grad_norm = 10.0  # the gradient norm is what sees the NaN (the losses are finite)
    result = t.run_step()
    hook.remove()
    assert result.skipped and result.iteration == 1  # counted: its images were consumed
    after = weights(t)
    assert all(torch.equal(before[k], after[k]) for k in before)  # BN statistics restored too
    t.close()


def test_a_checkpoint_of_before_hooks_kept_their_state_resumes_the_streak(tiny_config) -> None:
    from megdet_hpc.engine.hooks import NonFiniteGuard

    a = parts(tiny_config())
    a.run_step()
    state = copy.deepcopy(a.state_dict())
    a.close()
    del state["hooks"]
    state["nonfinite_streak"] = 2  # the key such checkpoints carried
    b = parts(tiny_config())
    guard = NonFiniteGuard(5)
    b.register_hooks([guard])
    b.load_state_dict(state)
    assert guard.streak == 2 and b.state_dict()["hooks"] == {"NonFiniteGuard": {"streak": 2}}
    b.close()
