"""A GradScaler overflow skips the update, and the step leaves the BN running statistics as they were
(as the non-finite guard does): a skipped step changes nothing (issue 16, item 5)."""

from __future__ import annotations

import torch

from megdet_hpc.config import load_config
from megdet_hpc.distributed.single import SingleProcessComm
from megdet_hpc.engine.defaults import build_run


def test_gradscaler_overflow_restores_bn_buffers(tiny_config) -> None:
    run = build_run(load_config(tiny_config(), ["data.num_workers=0"]), SingleProcessComm(), resume=False)
    trainer = run.trainer
    # AMP's scaler on the CPU (the trainer builds one only on CUDA) and one gradient overflowing, as
    # an fp16 gradient does under too large a scale.
    trainer.scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    weight = next(trainer.model.parameters())
    hook = weight.register_hook(lambda g: g * float("inf"))
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    result = trainer.run_step()
    hook.remove()
    assert not result.skipped  # an AMP overflow is the scaler's business, not the non-finite guard's
    assert trainer.scaler.get_scale() == 512.0  # the scaler saw the overflow and backed off
    after = trainer.model.state_dict()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert changed == [], changed[:5]
    assert any("running_mean" in k for k in before)  # the model has BN statistics to protect
    # A good step afterwards does move the statistics (the comparison is not vacuous).
    trainer.scaler = torch.amp.GradScaler("cpu", init_scale=1.0)
    assert not trainer.run_step().skipped
    moved = trainer.model.state_dict()
    assert any(not torch.equal(before[k], moved[k]) for k in before if "running_mean" in k)
    run.close()
