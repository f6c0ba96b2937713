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


def test_one_process_updates_running_statistics_once() -> None:
    """The local fast path (one process, and model.norm=bn) is recomputed without a second update."""
    from megdet_hpc.modeling import set_sampling_keys

    for norm in ("cgbn", "bn"):
        buffers = []
        for places in ("[]", "[backbone,fpn]"):
            torch.manual_seed(0)
            cfg = load_config(
                None,
                [
                    "model.backbone=resnet18",
                    "model.num_classes=3",
                    "model.min_size=64",
                    "model.max_size=64",
                    "model.anchor_sizes=[8,16,32,64,128]",
                    f"model.norm={norm}",
                    f"model.activation_checkpointing={places}",
                ],
            )
            model = build_model(cfg).train()
            set_sampling_keys(model, 0, [1])
            target = {"boxes": torch.tensor([[4.0, 6.0, 40.0, 50.0]]), "labels": torch.tensor([1])}
            sum(
                model([torch.rand(3, 64, 64, generator=torch.Generator().manual_seed(1))], [target]).values()
            ).backward()
            buffers.append(
                {k: v for k, v in model.state_dict().items() if "running" in k or "num_batches" in k}
            )
        plain, ckpt = buffers
        assert plain.keys() == ckpt.keys() and plain
        for key in plain:
            assert torch.allclose(plain[key].double(), ckpt[key].double(), atol=1e-6), (norm, key)


def test_state_dict_keys_do_not_change() -> None:
    base = ["model.backbone=resnet18", "model.num_classes=3", "model.cgbn_where=[backbone,fpn]"]
    plain = build_model(load_config(None, base))
    ckpt = build_model(load_config(None, [*base, "model.activation_checkpointing=[backbone,fpn]"]))
    assert list(plain.state_dict()) == list(ckpt.state_dict())
    assert isinstance(ckpt.backbone.body.layer3, CheckpointedSequential)
    assert not isinstance(ckpt.backbone.body.layer4, CheckpointedSequential)  # little memory, much compute
    assert isinstance(ckpt.backbone.fpn, CheckpointedFeaturePyramidNetwork)
    ckpt.load_state_dict(plain.state_dict())  # checkpoints move between the two freely
    with torch.no_grad():
        ckpt.eval()(torch.rand(1, 3, 64, 64).unbind(0))  # inference: no checkpointing, no error
