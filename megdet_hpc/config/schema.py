"""The configuration schema: typed, frozen dataclasses with the defaults a user can override.

Why dataclasses and not free-form dicts (mmdet) or yacs (detectron2): every key is declared once with
its type and default, so unknown keys and wrong types are caught on load with a one-line error, and
the resolved config can be stored in a checkpoint and compared on resume.  Frozen, like detectron2's
``cfg.freeze()``: code that needs another value builds a new config (``config.updated``) instead of
changing one that other parts of the program hold.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class ModelConfig:
    backbone: str = "resnet50"  # resnet18 | resnet34 | resnet50 | resnet101
    num_classes: int = 80  # foreground classes (background is added)
    backbone_weights: str = ""  # local torchvision ResNet state_dict (ImageNet weights) for the body
    weights: str = ""  # local path to full detector weights (state_dict or our checkpoint)
    norm: str = "cgbn"  # cgbn | bn (per-GPU BatchNorm) | frozen (FrozenBatchNorm2d)
    cgbn_where: list[str] = field(default_factory=lambda: ["backbone"])  # backbone, fpn, box_head
    bn_group_size: int = 0  # ranks sharing BN statistics; 0 = all ranks, 1 = local
    cgbn_two_pass: bool = False
    # MegDet's sub-linear memory: recompute these parts in backward (torch.utils.checkpoint).
    activation_checkpointing: list[str] = field(default_factory=list)  # backbone, fpn
    trainable_layers: int = 5
    min_size: int = 800
    max_size: int = 1333
    anchor_sizes: list[int] = field(default_factory=lambda: [32, 64, 128, 256, 512])
    aspect_ratios: list[float] = field(default_factory=lambda: [0.5, 1.0, 2.0])
    rpn_batch_size_per_image: int = 256
    rpn_pre_nms_top_n_train: int = 2000
    rpn_post_nms_top_n_train: int = 2000
    rpn_pre_nms_top_n_test: int = 1000
    rpn_post_nms_top_n_test: int = 1000
    box_batch_size_per_image: int = 512
    box_head_dim: int = 1024
    box_head_convs: int = 0  # >0: conv+norm box head (needed for CGBN in the box head)
    roi_sampling_ratio: int = 2
    box_score_thresh: float = 0.05
    box_detections_per_img: int = 100
    deterministic_sampling: bool = True  # RPN/RoI sampling seeded per (step, image)


@dataclass(frozen=True)
class DataConfig:
    train_images: str = "datasets/coco/train2017"
    train_annotations: str = "datasets/coco/annotations/instances_train2017.json"
    val_images: str = "datasets/coco/val2017"
    val_annotations: str = "datasets/coco/annotations/instances_val2017.json"
    images_per_gpu: int = 2
    num_workers: int = 2
    flip_prob: float = 0.5
    aspect_ratio_grouping: bool = True
    pin_memory: bool = True  # CUDA only: page-locked batches, copied ahead on a side stream


@dataclass(frozen=True)
class SolverConfig:
    base_lr: float = 0.02  # LR for base_batch images per step (linear scaling rule)
    base_batch: int = 16
    total_batch: int = 16  # images per optimizer step over all ranks
    grad_accum: int = 1
    momentum: float = 0.9
    weight_decay: float = 1e-4
    weight_decay_norm: float = 0.0
    weight_decay_bias: float = 1e-4
    warmup_factor: float = 0.001
    warmup_iters: int = 500  # at total_batch; converted to images
    max_iter: int = 90000
    steps: list[int] = field(default_factory=lambda: [60000, 80000])
    gamma: float = 0.1
    clip_grad_norm: float = 0.0  # 0 disables
    amp: str = "off"  # CUDA only: off | fp16 (with GradScaler) | bf16 (no scaler)
    fp16_compression: bool = False  # Horovod gradient compression (overlapped path only)
    # How gradients are averaged: "overlap" = during backward (hvd.DistributedOptimizer / DDP hooks),
    # "after_backward" = one coalesced allreduce after the last backward (the only path of the mpi
    # backend), "auto" = the backend's fastest (overlap for horovod/torch, after_backward for mpi).
    grad_sync: str = "auto"
    max_nonfinite: int = 3  # consecutive non-finite losses before aborting


@dataclass(frozen=True)
class TrainConfig:
    output_dir: str = "output/megdet"
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda
    threads: int = 0  # torch.set_num_threads per rank; 0 = leave
    log_period: int = 20
    checkpoint_period: int = 1000  # iterations; 0 disables
    checkpoint_minutes: float = 0.0  # also every N minutes; 0 disables
    keep_checkpoints: int = 3
    async_checkpoint: bool = True
    eval_period: int = 0  # iterations; 0 = only at the end
    eval_at_end: bool = True
    channels_last: bool = False
    cudnn_benchmark: bool = False  # CUDA: autotune conv algorithms per input shape
    tf32: bool = False  # CUDA: TF32 for fp32 matmuls (convolutions use torch's own default)
    deterministic: bool = False  # CUDA: deterministic cuDNN algorithms (exactness tests, debugging)
    requeue_signals: list[str] = field(default_factory=lambda: ["SIGUSR1", "SIGUSR2", "SIGTERM"])
    requeue: bool = True  # under Slurm, scontrol requeue after a signal checkpoint
    # Seconds without a completed step before every rank reports the collective it waits in and exits
    # with code 5 (a frozen or unreachable peer would otherwise block to the wall time); 0 disables.
    # Far above a real step (MegDet: ~1 s on 8 GPUs; checkpoints included); the first step gets twice
    # (warm-up); evaluations do not count.
    stall_timeout_s: float = 600.0
    tensorboard: bool = True


@dataclass(frozen=True)
class EvalConfig:
    max_images: int = 0  # 0 = the whole val set
    vis_images: int = 8  # validation images drawn with predictions after the final evaluation


@dataclass(frozen=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    solver: SolverConfig = field(default_factory=SolverConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
