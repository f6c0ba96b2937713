"""MegDet's sub-linear memory with CGBN: recomputation changes nothing but memory (real ranks)."""

from __future__ import annotations

import torch
from launchers import collect

from megdet_hpc.config import load_config
from megdet_hpc.modeling import build_model
from megdet_hpc.modeling.checkpointing import CheckpointedFeaturePyramidNetwork, CheckpointedSequential


def test_checkpointed_step_equals_the_plain_one_with_cgbn_over_two_ranks() -> None:
    """Same loss, gradients and BN buffers within 1e-5; the same collectives in the same order -- none
    issued by the recomputation, and the running statistics updated once."""
    reports = collect("mpirun", 2, ["tests/modeling/checkpointing_worker.py"], timeout=240)
    assert len(reports) == 2
    for rep in reports:
        assert rep["loss_diff"] <= 1e-5 and rep["grad_diff"] <= 1e-5 and rep["buffer_diff"] <= 1e-5, rep
        assert rep["grad_names_equal"] and rep["same_collectives"], rep
        fwd_plain, fwd_ckpt = rep["forward_collectives"]
        assert fwd_plain == fwd_ckpt > 20  # every CGBN layer of the body and the FPN, once


def test_state_dict_keys_do_not_change() -> None:
    base = ["model.backbone=resnet18", "model.num_classes=3", "model.cgbn_where=[backbone,fpn]"]
    plain = build_model(load_config(None, base))
    ckpt = build_model(load_config(None, [*base, "model.activation_checkpointing=[backbone,fpn]"]))
    assert list(plain.state_dict()) == list(ckpt.state_dict())
    assert isinstance(ckpt.backbone.body.layer3, CheckpointedSequential)
    assert isinstance(ckpt.backbone.fpn, CheckpointedFeaturePyramidNetwork)
    ckpt.load_state_dict(plain.state_dict())  # checkpoints move between the two freely
    with torch.no_grad():
        ckpt.eval()(torch.rand(1, 3, 64, 64).unbind(0))  # inference: no checkpointing, no error
