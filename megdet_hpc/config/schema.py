"""The configuration schema: typed, frozen dataclasses with the defaults a user can override.

Why dataclasses and not free-form dicts (mmdet) or yacs (detectron2): every key is declared once with
its type and default, so unknown keys and wrong types are caught on load with a one-line error, and
the resolved config can be stored in a checkpoint and compared on resume.  Frozen, like detectron2's
``cfg.freeze()``: code that needs another value builds a new config (``config.updated``) instead of
changing one that other parts of the program hold; lists are stored as tuples, so nothing inside
it changes either (``to_dict`` gives them back as lists: checkpoints and YAML hold plain lists).

Each key's allowed values and bounds are declared here, beside its default (``key(default, *rules)``,
``rules.py``), and nowhere else: ``validate`` runs them, plus the few rules relating several keys;
``architecture=True`` marks the keys a checkpoint's weights depend on.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from megdet_hpc.config.rules import (
    above,
    at_least,
    between,
    choice,
    each_choice,
    increasing_positive,
    interval,
    key,
    not_blank,
    positive_values,
    signal_names,
)

DEFAULT_IMAGES_PER_GPU = 2  # MegDet's (and detectron2's) images per GPU; launchers default to it too
FPN_LEVELS = 5  # torchvision's ResNet-FPN: 4 stages + the max-pool level, one anchor size each


@dataclass(frozen=True)
class ModelConfig:
    backbone: str = key(
        "resnet50", choice("resnet18", "resnet34", "resnet50", "resnet101"), architecture=True
    )
    num_classes: int = key(80, above(0), architecture=True)  # foreground classes (background is added)
    backbone_weights: str = ""  # local torchvision ResNet state_dict (ImageNet weights) for the body
    weights: str = ""  # local path to full detector weights (state_dict or our checkpoint)
    # cgbn | bn (per-GPU BatchNorm) | frozen (FrozenBatchNorm2d)
    norm: str = key("cgbn", choice("cgbn", "bn", "frozen"), architecture=True)
    cgbn_where: tuple[str, ...] = key(
        ("backbone",), each_choice("backbone", "fpn", "box_head"), architecture=True
    )
    bn_group_size: int = key(0, at_least(0))  # ranks sharing BN statistics; 0 = all ranks, 1 = local
    cgbn_two_pass: bool = False
    # CGBN kernels: auto (torch's fused SyncBN kernels on CUDA, portable elsewhere) | portable | fused |
    # compiled (torch.compile: 4 fused kernels per layer instead of ~30 launches; compiles once per run)
    cgbn_kernels: str = key("auto", choice("auto", "portable", "fused", "compiled"))
    # MegDet's sub-linear memory: recompute these parts in backward (torch.utils.checkpoint).
    activation_checkpointing: tuple[str, ...] = key((), each_choice("backbone", "fpn"))
    trainable_layers: int = key(5, between(0, 5))
    min_size: int = key(800, above(0))
    max_size: int = key(1333, above(0))
    anchor_sizes: tuple[int, ...] = key(
        (32, 64, 128, 256, 512),
        positive_values(FPN_LEVELS, "sizes (one per FPN level)"),
        architecture=True,
    )
    aspect_ratios: tuple[float, ...] = key((0.5, 1.0, 2.0), positive_values(), architecture=True)
    rpn_batch_size_per_image: int = key(256, above(0))
    rpn_pre_nms_top_n_train: int = key(2000, above(0))
    rpn_post_nms_top_n_train: int = key(2000, above(0))
    rpn_pre_nms_top_n_test: int = key(1000, above(0))
    rpn_post_nms_top_n_test: int = key(1000, above(0))
    box_batch_size_per_image: int = key(512, above(0))
    box_head_dim: int = key(1024, above(0), architecture=True)
    # >0: conv+norm box head (needed for CGBN in the box head)
    box_head_convs: int = key(0, at_least(0), architecture=True)
    roi_sampling_ratio: int = key(2, at_least(0))
    box_score_thresh: float = key(0.05, interval(0, 1))
    box_detections_per_img: int = key(100, above(0))
    deterministic_sampling: bool = True  # RPN/RoI sampling seeded per (step, image)


@dataclass(frozen=True)
class DataConfig:
    train_images: str = "datasets/coco/train2017"
    train_annotations: str = "datasets/coco/annotations/instances_train2017.json"
    val_images: str = "datasets/coco/val2017"
    val_annotations: str = "datasets/coco/annotations/instances_val2017.json"
    images_per_gpu: int = key(DEFAULT_IMAGES_PER_GPU, above(0))
    num_workers: int = key(2, at_least(0))
    flip_prob: float = key(0.5, interval(0, 1))
    aspect_ratio_grouping: bool = True
    pin_memory: bool = True  # CUDA only: page-locked batches, copied ahead on a side stream


@dataclass(frozen=True)
class SolverConfig:
    base_lr: float = key(0.02, above(0))  # LR for base_batch images per step (linear scaling rule)
    base_batch: int = key(16, above(0))
    total_batch: int = key(16, above(0))  # images per optimizer step over all ranks
    grad_accum: int = key(1, above(0))
    momentum: float = key(0.9, interval(0, 1, open_high=True))
    weight_decay: float = key(1e-4, at_least(0))
    weight_decay_norm: float = key(0.0, at_least(0))
    weight_decay_bias: float = key(1e-4, at_least(0))
    warmup_factor: float = key(0.001, interval(0, 1, open_low=True))
    warmup_iters: int = key(500, at_least(0))  # at total_batch; converted to images
    max_iter: int = key(90000, above(0))
    steps: tuple[int, ...] = key((60000, 80000), increasing_positive())
    gamma: float = key(0.1, above(0))
    clip_grad_norm: float = key(0.0, at_least(0))  # 0 disables
    # CUDA only: off | fp16 (with GradScaler) | bf16 (no scaler)
    amp: str = key("off", choice("off", "fp16", "bf16"))
    fp16_compression: bool = False  # Horovod gradient compression (overlapped path only)
    # How gradients are averaged: "overlap" = during backward (hvd.DistributedOptimizer / DDP hooks),
    # "after_backward" = one coalesced allreduce after the last backward (the only path of the mpi
    # backend), "auto" = the backend's fastest (overlap for horovod/torch, after_backward for mpi).
    grad_sync: str = key("auto", choice("auto", "overlap", "after_backward"))
    max_nonfinite: int = key(3, above(0))  # consecutive non-finite losses before aborting


@dataclass(frozen=True)
class TrainConfig:
    output_dir: str = key("output/megdet", not_blank())
    seed: int = key(0, at_least(0))
    device: str = key("auto", choice("auto", "cpu", "cuda"))
    threads: int = key(0, at_least(0))  # torch.set_num_threads per rank; 0 = leave
    log_period: int = key(20, above(0))
    checkpoint_period: int = key(1000, at_least(0))  # iterations; 0 disables
    checkpoint_minutes: float = key(0.0, at_least(0))  # also every N minutes; 0 disables
    keep_checkpoints: int = key(3, above(0))
    async_checkpoint: bool = True
    eval_period: int = key(0, at_least(0))  # iterations; 0 = only at the end
    eval_at_end: bool = True
    channels_last: bool = False
    cudnn_benchmark: bool = False  # CUDA: autotune conv algorithms per input shape
    tf32: bool = False  # CUDA: TF32 for fp32 matmuls (convolutions use torch's own default)
    deterministic: bool = False  # CUDA: deterministic cuDNN algorithms (exactness tests, debugging)
    requeue_signals: tuple[str, ...] = key(("SIGUSR1", "SIGUSR2", "SIGTERM"), signal_names())
    requeue: bool = True  # under Slurm, scontrol requeue after a signal checkpoint
    # Seconds without a completed step before every rank reports the collective it waits in and exits
    # with code 5 (a frozen or unreachable peer would otherwise block to the wall time); 0 disables.
    # Far above a real step (MegDet: ~1 s on 8 GPUs; checkpoints included); the first step gets twice
    # (warm-up); evaluations do not count.
    stall_timeout_s: float = key(600.0, at_least(0))
    tensorboard: bool = True
    # PNGs of the training curves (end of training) and of the PR curves (each evaluation), rank 0;
    # matplotlib costs ~1.5 s of CPU per run, which a job array of short runs may not want.
    plots: bool = True


@dataclass(frozen=True)
class EvalConfig:
    max_images: int = key(0, at_least(0))  # 0 = the whole val set
    vis_images: int = key(
        8, at_least(0)
    )  # validation images drawn with predictions after the final evaluation


@dataclass(frozen=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    solver: SolverConfig = field(default_factory=SolverConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
