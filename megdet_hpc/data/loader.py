"""Build datasets and loaders from the config."""

from __future__ import annotations

from typing import Any

import torch

from megdet_hpc.config import BatchPlan, Config
from megdet_hpc.data.coco import CocoDetection
from megdet_hpc.data.sampler import ResumableGroupedSampler


class _KeyedDataset(torch.utils.data.Dataset):
    """Passes the sampler's (epoch, batch number) through so the trainer knows what it consumed."""

    def __init__(self, dataset: CocoDetection) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int, int, int]) -> tuple[torch.Tensor, dict[str, Any]]:
        index, flip_seed, epoch, number = key
        image, target = self.dataset[(index, flip_seed)]
        target["_position"] = (epoch, number)
        return image, target


def _ignore_preemption_signals(_worker_id: int) -> None:
    """Slurm signals every process of a step, DataLoader workers included; a worker killed by USR1 or
    TERM would crash the trainer before it can checkpoint.  Workers ignore them (the trainer handles
    them) and are shut down explicitly by the trainer (``shutdown_loader``).  SIGINT and SIGHUP too: a
    terminal's Ctrl-C reaches the whole process group, and a worker ended by it would turn the
    trainer's checkpoint-and-stop into "DataLoader worker exited unexpectedly"."""
    import signal

    for name in ("SIGUSR1", "SIGUSR2", "SIGTERM", "SIGINT", "SIGHUP"):
        signal.signal(getattr(signal, name), signal.SIG_IGN)


def collate(batch: list[tuple[torch.Tensor, dict[str, Any]]]) -> tuple[list, list, tuple[int, int]]:
    images = [b[0] for b in batch]
    targets = [b[1] for b in batch]
    position = targets[-1].pop("_position")
    for t in targets[:-1]:
        t.pop("_position", None)
    return images, targets, position


def build_train_dataset(cfg: Config) -> CocoDetection:
    return CocoDetection(
        cfg.data.train_images, cfg.data.train_annotations, train=True, flip_prob=cfg.data.flip_prob
    )


def build_val_dataset(cfg: Config) -> CocoDetection:
    return CocoDetection(cfg.data.val_images, cfg.data.val_annotations, train=False)


def build_train_loader(
    cfg: Config, dataset: CocoDetection, rank: int, world: int, device: torch.device
) -> tuple[torch.utils.data.DataLoader, ResumableGroupedSampler]:
    """The loader of this rank.  The sampler draws one global batch (all ranks, one forward/backward
    pass: ``grad_accum`` of them make an optimizer step) at a time; ``cfg`` must hold the job's
    resolved batch layout."""
    sampler = ResumableGroupedSampler(
        dataset.aspect_ratios,
        BatchPlan(world, cfg.data.images_per_gpu, cfg.solver.grad_accum)
        .check(cfg.solver.total_batch)
        .per_pass,
        rank,
        world,
        seed=cfg.train.seed,
        group_by_aspect=cfg.data.aspect_ratio_grouping,
    )
    loader = torch.utils.data.DataLoader(
        _KeyedDataset(dataset),
        batch_sampler=sampler,
        num_workers=cfg.data.num_workers,
        collate_fn=collate,
        worker_init_fn=_ignore_preemption_signals,
        prefetch_factor=2 if cfg.data.num_workers > 0 else None,
        pin_memory=cfg.data.pin_memory and device.type == "cuda",
    )
    return loader, sampler
