"""The detector's dense part on fake CUDA tensors: image transform, ResNet + FPN with CGBN, RPN head,
anchors and box decoding, box head and predictor -- forward and backward stay on the GPU and never
read a device value on the host.

What is left out is torchvision's own data-dependent code, host synchronisations on a real GPU too:
the resize's random size choice (``.item()`` on a CPU tensor), NMS (its output size), ``MultiScaleRoIAlign``'s per-level ``torch.where`` and the ``Matcher``'s
low-quality matches.  See ``tests/fake_cuda.py`` for what fake tensors catch.
"""

from __future__ import annotations

import torch
from fake_cuda import backward, fake_cuda
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.rpn import concat_box_prediction_layers

from megdet_hpc.config import load_config
from megdet_hpc.distributed.single import SingleProcessComm
from megdet_hpc.layers import CrossGPUBatchNorm2d
from megdet_hpc.modeling import build_model

SMALL = [
    "model.backbone=resnet18",
    "model.num_classes=3",
    "model.min_size=64",
    "model.max_size=64",
    "model.norm=cgbn",
    "model.cgbn_where=[backbone, fpn]",
]


def test_dense_detector_step_on_fake_cuda() -> None:
    cfg = load_config(None, SMALL)
    with fake_cuda():
        with torch.device("cuda"):
            model = build_model(cfg).train()
        layers = [m for m in model.modules() if isinstance(m, CrossGPUBatchNorm2d)]
        assert layers
        for m in layers:  # the statistics path, as with several ranks
            m._comm, m.force_sync = SingleProcessComm(), True
        # The loader's batch (torchvision's own resize draws its size with .item(), on the CPU)
        pixels = model.transform.normalize(torch.rand(3, 64, 64, device="cuda"))
        batch = ImageList(torch.stack([pixels, pixels]), [(64, 64), (60, 64)])
        features = model.backbone(batch.tensors)
        maps = list(features.values())
        objectness, deltas = model.rpn.head(maps)
        anchors = model.rpn.anchor_generator(batch, maps)
        _, flat_deltas = concat_box_prediction_layers(objectness, deltas)
        boxes = model.rpn.box_coder.decode(flat_deltas.detach(), anchors)
        assert boxes.device.type == "cuda" and all(a.device.type == "cuda" for a in anchors)
        rois = torch.rand(
            2 * 16, maps[0].shape[1], 7, 7, device="cuda"
        )  # what MultiScaleRoIAlign would return
        scores, box_deltas = model.roi_heads.box_predictor(model.roi_heads.box_head(rois))
        loss = sum(o.float().mean() for o in objectness) + sum(d.float().mean() for d in deltas)
        loss = loss + scores.float().mean() + box_deltas.float().mean()
        loss = loss + sum(f.float().mean() for f in maps)
        backward([loss], [torch.ones_like(loss)])
        grads = [p.grad for p in model.parameters() if p.requires_grad]
        assert grads and all(g is not None and g.device.type == "cuda" for g in grads[:5])
        body_grads = [p.grad for p in model.backbone.parameters() if p.requires_grad]
        assert all(g is not None and g.device.type == "cuda" for g in body_grads)
        assert all(m.running_mean.device.type == "cuda" for m in layers)
