"""The MegDet detector: torchvision Faster R-CNN + FPN on a ResNet, with CGBN where configured.

Built with ``weights=None`` (no downloads); ImageNet backbone weights or full detector weights load
from local files named in the config.  Backbone BN is *trainable* BatchNorm turned into CGBN (not
torchvision's default FrozenBatchNorm2d): training BN with a large, cross-GPU batch is MegDet's point.
``model.cgbn_where`` adds norm layers to the FPN and a conv box head (the fasterrcnn_v2 style) so CGBN
can also go there.  ``model.activation_checkpointing`` recomputes the ResNet stages and/or the FPN in
backward (``modeling/checkpointing.py``).
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

import torch
import torchvision
from torch import nn
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor
from torchvision.models.detection.faster_rcnn import FastRCNNConvFCHead, FastRCNNPredictor, TwoMLPHead
from torchvision.ops import MultiScaleRoIAlign
from torchvision.ops.misc import FrozenBatchNorm2d

from megdet_hpc.checkpoint.io import CheckpointError, safe_load
from megdet_hpc.config import Config, ConfigError
from megdet_hpc.layers import convert_to_cgbn
from megdet_hpc.modeling.checkpointing import enable_activation_checkpointing
from megdet_hpc.modeling.sampling import install_seeded_samplers

# Prefixes other tools put in front of a ResNet's keys: DDP, and our own / torchvision's detectors.
_BACKBONE_PREFIXES = ("module.", "backbone.body.")


def _load_state(path: str, what: str) -> dict[str, torch.Tensor]:
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"{what} file not found: {file}")
    try:
        state = safe_load(file)
    except CheckpointError as exc:
        raise ConfigError(f"{what} file {exc}") from exc
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ConfigError(f"{what} file {file} does not hold a state_dict (name -> tensor)")
    return state


def _strip_prefixes(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    for prefix in _BACKBONE_PREFIXES:
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix) :]: v for k, v in state.items()}
    return state


def load_backbone_weights(body: nn.Module, path: str, backbone: str) -> None:
    """Load a torchvision-format ResNet state_dict into ``body``: every tensor of the body must arrive.

    Missing or unexpected keys are an error naming them (a silent partial load trains from a random
    backbone without saying so); only the classifier (``fc.*``, absent from detection checkpoints) may
    be missing, and ``num_batches_tracked`` may come or go (FrozenBatchNorm2d has none).
    """
    state = _strip_prefixes(_load_state(path, "model.backbone_weights"))
    try:
        result = body.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # shape mismatches raise even when not strict
        lines = [line.strip() for line in str(exc).splitlines() if "size mismatch" in line]
        detail = lines[0] if lines else str(exc).splitlines()[0]
        raise ConfigError(f"model.backbone_weights {path} does not fit {backbone}: {detail}") from exc
    missing = [
        k for k in result.missing_keys if not k.startswith("fc.") and not k.endswith("num_batches_tracked")
    ]
    unexpected = [k for k in result.unexpected_keys if not k.endswith("num_batches_tracked")]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(
                f"{len(missing)} missing key(s) ({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''})"
            )
        if unexpected:
            parts.append(
                f"{len(unexpected)} unexpected key(s) ({', '.join(unexpected[:3])}{', ...' if len(unexpected) > 3 else ''})"
            )
        raise ConfigError(f"model.backbone_weights {path} does not match {backbone}: {'; '.join(parts)}")


def build_model(cfg: Config) -> FasterRCNN:
    m = cfg.model
    norm_layer: type[nn.Module] = FrozenBatchNorm2d if m.norm == "frozen" else nn.BatchNorm2d
    body = getattr(torchvision.models, m.backbone)(weights=None, norm_layer=norm_layer)
    if m.backbone_weights:
        load_backbone_weights(body, m.backbone_weights, m.backbone)
    fpn_norm = nn.BatchNorm2d if (m.norm == "cgbn" and "fpn" in m.cgbn_where) else None
    backbone = _resnet_fpn_extractor(body, m.trainable_layers, norm_layer=fpn_norm)
    sizes = tuple((s,) for s in m.anchor_sizes)
    anchors = AnchorGenerator(sizes, (tuple(m.aspect_ratios),) * len(sizes))
    roi_pool = MultiScaleRoIAlign(["0", "1", "2", "3"], output_size=7, sampling_ratio=m.roi_sampling_ratio)
    if m.box_head_convs > 0:
        head_norm = nn.BatchNorm2d if m.norm != "frozen" else None
        box_head: nn.Module = FastRCNNConvFCHead(
            (backbone.out_channels, 7, 7), [256] * m.box_head_convs, [m.box_head_dim], norm_layer=head_norm
        )
    else:
        box_head = TwoMLPHead(backbone.out_channels * 7 * 7, m.box_head_dim)
    model = FasterRCNN(
        backbone,
        num_classes=None,
        min_size=m.min_size,
        max_size=m.max_size,
        rpn_anchor_generator=anchors,
        rpn_batch_size_per_image=m.rpn_batch_size_per_image,
        rpn_pre_nms_top_n_train=m.rpn_pre_nms_top_n_train,
        rpn_post_nms_top_n_train=m.rpn_post_nms_top_n_train,
        rpn_pre_nms_top_n_test=m.rpn_pre_nms_top_n_test,
        rpn_post_nms_top_n_test=m.rpn_post_nms_top_n_test,
        box_roi_pool=roi_pool,
        box_head=box_head,
        box_predictor=FastRCNNPredictor(m.box_head_dim, m.num_classes + 1),
        box_batch_size_per_image=m.box_batch_size_per_image,
        box_score_thresh=m.box_score_thresh,
        box_detections_per_img=m.box_detections_per_img,
    )
    if m.weights:
        state = _load_state(m.weights, "model.weights")
        try:
            model.load_state_dict(state)
        except RuntimeError as exc:
            first = str(exc).splitlines()[0]
            raise ConfigError(
                f"model.weights {m.weights} does not match the configured model: {first}"
            ) from exc
    if m.norm == "cgbn":
        group = m.bn_group_size or None
        convert = partial(convert_to_cgbn, group_size=group, two_pass=m.cgbn_two_pass, kernels=m.cgbn_kernels)
        if "backbone" in m.cgbn_where:
            convert(model.backbone.body)
        if "fpn" in m.cgbn_where:
            convert(model.backbone.fpn)
        if "box_head" in m.cgbn_where:
            convert(model.roi_heads.box_head)
    if m.activation_checkpointing:
        if m.norm == "bn":  # plain BN would update its running statistics again in the recomputation
            convert_to_cgbn(model.backbone, group_size=1)
            convert_to_cgbn(model.roi_heads.box_head, group_size=1)
        enable_activation_checkpointing(model, m.activation_checkpointing)
    if m.deterministic_sampling:
        install_seeded_samplers(model)
    return model
