"""On every rank: one forward/backward of the same CGBN detector with and without activation
checkpointing; reports the differences (loss, gradients, BN buffers) and the collectives of each."""

from __future__ import annotations

import torch

from megdet_hpc import distributed
from megdet_hpc.config import load_config
from megdet_hpc.distributed.comm import Comm
from megdet_hpc.launch.local import write_report
from megdet_hpc.modeling import build_model, set_sampling_keys

TINY = [
    "model.backbone=resnet18",
    "model.num_classes=3",
    "model.min_size=64",
    "model.max_size=64",
    "model.anchor_sizes=[8,16,32,64,128]",
    "model.rpn_batch_size_per_image=64",
    "model.box_batch_size_per_image=32",
    "model.box_head_dim=64",
    "model.roi_sampling_ratio=1",
    "model.rpn_pre_nms_top_n_train=300",
    "model.rpn_post_nms_top_n_train=200",
    "model.cgbn_where=[backbone,fpn]",
]


def one_step(comm, places: str) -> dict:  # type: ignore[no-untyped-def]
    torch.manual_seed(0)
    model = build_model(load_config(None, [*TINY, f"model.activation_checkpointing={places}"])).train()
    gen = torch.Generator().manual_seed(100 + comm.rank)
    images = [torch.rand(3, 64, 64, generator=gen)]
    targets = [
        {
            "boxes": torch.tensor([[4.0, 6.0, 40.0, 50.0], [30.0, 20.0, 60.0, 62.0]]),
            "labels": torch.tensor([1, 3]),
        }
    ]
    set_sampling_keys(model, 0, [comm.rank])
    comm.counters.reset(keep_log=True)
    losses = model(images, targets)
    forward = list(comm.counters.log)
    loss = sum(losses.values())
    loss.backward()
    return {
        "loss": loss.item(),
        "grads": {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None},
        "buffers": {n: b.clone() for n, b in model.named_buffers()},
        "forward": forward,
        "all": list(comm.counters.log),
    }


def main(comm: Comm) -> None:
    plain, ckpt = one_step(comm, "[]"), one_step(comm, "[backbone,fpn]")
    write_report(
        comm.rank,
        {
            "loss_diff": abs(plain["loss"] - ckpt["loss"]),
            "grad_diff": max((plain["grads"][n] - g).abs().max().item() for n, g in ckpt["grads"].items()),
            "grad_names_equal": sorted(plain["grads"]) == sorted(ckpt["grads"]),
            "buffer_diff": max(
                (plain["buffers"][n].double() - b.double()).abs().max().item()
                for n, b in ckpt["buffers"].items()
            ),
            "forward_collectives": [len(plain["forward"]), len(ckpt["forward"])],
            "same_collectives": plain["all"] == ckpt["all"],
            "collectives": len(plain["all"]),
        },
    )


if __name__ == "__main__":
    distributed.run_with_comm(main)
