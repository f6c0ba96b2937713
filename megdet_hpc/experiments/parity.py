"""``python -m megdet_hpc.experiments.parity``: does megdet_hpc train as well as torchvision's reference loop?

The demo detector (``configs/demo_cpu.yaml``: ResNet-18 FPN from scratch, 128 px, the embedded data) is
trained by two systems on the same schedule and evaluated by the same pycocotools code
(``megdet_hpc.evaluation.evaluate``) on the same 100 validation images, after every epoch:

* **megdet_hpc**: ``python -m megdet_hpc.train`` under ``mpirun``, 2 ranks x 2 images, CGBN over the
  4 images of a step, its own keyed RPN/RoI samplers, LR as a function of images seen, the
  non-finite guard, its resumable sampler and loader (through ``megdet_table.execute``);
* **torchvision**: a plain loop in the shape of torchvision's ``references/detection`` (``train.py`` +
  ``engine.train_one_epoch``), self-contained here: torchvision's own ``FasterRCNN`` with its own
  ``BalancedPositiveNegativeSampler`` (global RNG), ``resnet_fpn_backbone`` with trainable BatchNorm,
  the same anchors, image size, RPN/RoI sizes and box head; ``RandomSampler`` batches of 4 (what
  ``GroupedBatchSampler`` reduces to with one aspect ratio), ``RandomHorizontalFlip(0.5)``; SGD
  momentum 0.9, weight decay 1e-4 except on norm parameters (``--norm-weight-decay 0``, as megdet_hpc),
  ``LinearLR`` warmup in epoch 0 over ``min(1000, len(loader) - 1)`` iterations from 1/1000, then
  ``MultiStepLR`` per epoch.  DDP with ``nn.SyncBatchNorm`` is CUDA-only, so on CPU the reference
  trains the same batch of 4 in **one process with plain BN** (BN statistics over the same 4 images a
  megdet_hpc step normalises over with CGBN).

Both see the same number of images (``--epochs`` x the training images with boxes: 200 of the default
``--train-images 202``) at the same LR for every step: base LR 0.02 at batch 4, warmup over one epoch
less one iteration (torchvision's rule, ``min(1000, len(loader) - 1)``: 49 by default; applied to
megdet_hpc through ``solver.warmup_iters``), one step x0.1 at ``--step-epoch``.  Every run is resumable (megdet_hpc from
its time-based checkpoints, the reference from its per-epoch ``checkpoint.pth``, as the reference's
``--resume``); a finished run is skipped.  Results go to ``--results``: ``parity.md`` (mean +- seed
standard deviation of AP, AP50, AP75, time per image, and the verdict), ``parity.json`` (every run,
curves, provenance) and ``parity_ap_vs_images.png``.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from megdet_hpc.utils.cli import EXIT_NONFINITE, EXIT_OK, ArgumentParser, run_cli
from megdet_hpc.utils.errors import UserError

SYSTEMS = ("megdet_hpc", "torchvision")
LABELS = {
    "megdet_hpc": "megdet_hpc (2 ranks x 2 images, CGBN)",
    "torchvision": "torchvision reference loop (1 process x 4 images, BN)",
}
SEEDS = (0, 1, 2)
WINDOW = 10  # iterations per timing/loss record (megdet_hpc's train.log_period in megdet_table)


@dataclass(frozen=True)
class Plan:
    """The shared schedule, in iterations of ``batch`` images."""

    train_images: int
    batch: int
    lr: float
    epochs: int
    step_epoch: int
    val_images: int = 100  # for the table's description
    size: int = 128

    @property
    def iters_per_epoch(self) -> int:
        return math.ceil(self.train_images / self.batch)

    @property
    def warmup_iters(self) -> int:  # references/detection/engine.py: min(1000, len(data_loader) - 1)
        return min(1000, self.iters_per_epoch - 1)

    @property
    def max_iter(self) -> int:
        return self.epochs * self.iters_per_epoch

    @property
    def images(self) -> int:
        return self.max_iter * self.batch


@dataclass
class Outcome:
    system: str
    seed: int
    status: str = "pending"  # done | diverged | failed | pending
    wall_s: float = 0.0
    AP: float | None = None
    AP50: float | None = None
    AP75: float | None = None
    ms_per_image: float | None = None  # training only: median over windows of WINDOW iterations
    evals: list[dict[str, float]] = field(default_factory=list)  # {"images_seen", "AP", "AP50", "AP75"}
    curves: dict[str, list[float]] = field(default_factory=dict)


# -- the torchvision reference loop -------------------------------------------------------------------
def build_reference_model(cfg: Any) -> Any:
    """torchvision's FasterRCNN with its stock samplers, built from the config's numbers."""
    from torch import nn
    from torchvision.models.detection import FasterRCNN
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.models.detection.backbone_utils import resnet_fpn_backbone
    from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
    from torchvision.ops import MultiScaleRoIAlign

    m = cfg.model
    backbone = resnet_fpn_backbone(
        backbone_name=m.backbone, weights=None, norm_layer=nn.BatchNorm2d, trainable_layers=m.trainable_layers
    )
    sizes = tuple((s,) for s in m.anchor_sizes)
    return FasterRCNN(
        backbone,
        num_classes=None,
        min_size=m.min_size,
        max_size=m.max_size,
        rpn_anchor_generator=AnchorGenerator(sizes, (tuple(m.aspect_ratios),) * len(sizes)),
        rpn_batch_size_per_image=m.rpn_batch_size_per_image,
        rpn_pre_nms_top_n_train=m.rpn_pre_nms_top_n_train,
        rpn_post_nms_top_n_train=m.rpn_post_nms_top_n_train,
        rpn_pre_nms_top_n_test=m.rpn_pre_nms_top_n_test,
        rpn_post_nms_top_n_test=m.rpn_post_nms_top_n_test,
        box_roi_pool=MultiScaleRoIAlign(["0", "1", "2", "3"], 7, sampling_ratio=m.roi_sampling_ratio),
        box_head=TwoMLPHead(backbone.out_channels * 7 * 7, m.box_head_dim),
        box_predictor=FastRCNNPredictor(m.box_head_dim, m.num_classes + 1),
        box_batch_size_per_image=m.box_batch_size_per_image,
        box_score_thresh=m.box_score_thresh,
        box_detections_per_img=m.box_detections_per_img,
    )


class _FlipFloat:
    """The reference's transforms: ``RandomHorizontalFlip(0.5)`` (global RNG), then a float image."""

    def __init__(self, dataset: Any, flip_prob: float) -> None:
        self.dataset, self.flip_prob = dataset, flip_prob

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[Any, dict[str, Any]]:
        import torch

        from megdet_hpc.data.coco import to_float

        image, target = self.dataset[index]
        boxes = target["boxes"]
        if torch.rand(1).item() < self.flip_prob:
            image = image.flip(-1)
            boxes = boxes.clone()
            boxes[:, [0, 2]] = image.shape[-1] - boxes[:, [2, 0]]
        return to_float(image), {"boxes": boxes, "labels": target["labels"]}


def _collate(batch: list) -> tuple:
    return tuple(zip(*batch))


def reference_train(folder: Path, config: Path, opts: list[str], seed: int, plan: Plan, threads: int) -> int:
    """One reference run (``references/detection/train.py`` shape); resumes from ``checkpoint.pth``."""
    import torch
    from torchvision.ops._utils import split_normalization_params

    from megdet_hpc.config import load_config
    from megdet_hpc.data.coco import CocoDetection
    from megdet_hpc.distributed.single import SingleProcessComm
    from megdet_hpc.evaluation import evaluate

    torch.set_num_threads(threads)
    cfg = load_config(config, opts)
    train_set = CocoDetection(cfg.data.train_images, cfg.data.train_annotations, train=True)
    val_set = CocoDetection(cfg.data.val_images, cfg.data.val_annotations, train=False)
    if len(train_set) != plan.train_images:
        raise UserError(f"{len(train_set)} training images, the plan says {plan.train_images}")
    torch.manual_seed(seed)
    model = build_reference_model(cfg)
    norm, other = split_normalization_params(model)
    groups = [{"params": p, "weight_decay": w} for p, w in ((norm, 0.0), (other, cfg.solver.weight_decay))]
    optimizer = torch.optim.SGD(groups, lr=plan.lr, momentum=cfg.solver.momentum)
    lr_scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, [plan.step_epoch], cfg.solver.gamma)
    checkpoint = folder / "checkpoint.pth"
    start_epoch, history = 0, []
    if checkpoint.is_file():
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        lr_scheduler.load_state_dict(state["lr_scheduler"])
        start_epoch, history = state["epoch"] + 1, json.loads(state["history"])
        print(f"resumed from {checkpoint} after epoch {state['epoch']}", flush=True)
    comm = SingleProcessComm()
    device = torch.device("cpu")
    data = _FlipFloat(train_set, cfg.data.flip_prob)
    for epoch in range(start_epoch, plan.epochs):
        torch.manual_seed(seed * 1000 + epoch + 1)  # sampler, flips, RPN/RoI samplers: resumable per epoch
        sampler = torch.utils.data.BatchSampler(torch.utils.data.RandomSampler(data), plan.batch, False)
        loader = torch.utils.data.DataLoader(data, batch_sampler=sampler, collate_fn=_collate)
        records = train_one_epoch(model, optimizer, loader, epoch, plan)
        history.extend(records)
        if records and not math.isfinite(records[-1]["loss"]):
            _write_history(folder, history)
            return EXIT_NONFINITE
        lr_scheduler.step()
        last = epoch == plan.epochs - 1
        where = folder / ("eval" if last else f"eval_epoch{epoch}")
        metrics = evaluate(model, val_set, comm, device, where, cfg.eval.max_images)
        seen = (epoch + 1) * plan.iters_per_epoch * plan.batch
        history.append({"images_seen": seen, **{k: metrics[k] for k in ("AP", "AP50", "AP75")}})
        print(f"epoch {epoch}: {seen} images, AP {metrics['AP']:.4f} AP50 {metrics['AP50']:.4f}", flush=True)
        tmp = checkpoint.with_suffix(".tmp")
        torch.save(
            {
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "lr_scheduler": lr_scheduler.state_dict(),
                "epoch": epoch,
                "history": json.dumps(history),
            },
            tmp,
        )
        os.replace(tmp, checkpoint)
        _write_history(folder, history)
    return EXIT_OK


def _write_history(folder: Path, history: list[dict[str, float]]) -> None:
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in history))


def train_one_epoch(
    model: Any, optimizer: Any, loader: Any, epoch: int, plan: Plan
) -> list[dict[str, float]]:
    """``references/detection/engine.py``'s loop; a record (images seen, loss, lr, images/s) every
    WINDOW iterations; stops at the first non-finite loss (the reference exits there)."""
    import torch

    model.train()
    lr_scheduler = None
    if epoch == 0:
        lr_scheduler = torch.optim.lr_scheduler.LinearLR(
            optimizer, start_factor=1.0 / 1000, total_iters=plan.warmup_iters
        )
    records, losses, start = [], [], time.perf_counter()
    for i, (images, targets) in enumerate(loader):
        lr = optimizer.param_groups[0]["lr"]
        loss_dict = model(list(images), list(targets))
        loss = sum(loss_dict.values())
        value = loss.item()
        iteration = epoch * plan.iters_per_epoch + i + 1
        if not math.isfinite(value):
            print(f"Loss is {value}, stopping training", flush=True)
            records.append({"images_seen": iteration * plan.batch, "loss": value, "lr": lr})
            return records
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if lr_scheduler is not None:
            lr_scheduler.step()
        losses.append(value)
        if len(losses) == WINDOW or i == len(loader) - 1:
            elapsed = time.perf_counter() - start
            records.append(
                {
                    "images_seen": iteration * plan.batch,
                    "loss": statistics.fmean(losses),
                    "loss_step": value,  # this iteration's loss alone: what megdet_hpc's metrics record
                    "lr": lr,
                    "images_per_s": len(losses) * plan.batch / elapsed,
                }
            )
            print(f"[{iteration}] loss {records[-1]['loss']:.4f} lr {lr:.5f}", flush=True)
            losses, start = [], time.perf_counter()
    return records


# -- the experiment ------------------------------------------------------------------------------------
def _state(folder: Path) -> dict[str, Any]:
    path = folder / "experiment.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def execute_reference(
    folder: Path, config: Path, opts: list[str], seed: int, plan: Plan, threads: int
) -> dict[str, Any]:
    folder.mkdir(parents=True, exist_ok=True)
    state = _state(folder)
    if state.get("status") in ("done", "diverged"):
        print(f"[parity] torchvision, seed {seed}: {state['status']} earlier, skipped", flush=True)
        return state
    print(f"[parity] torchvision, seed {seed}: 1 process x {plan.batch}, BN -> {folder}", flush=True)
    argv = [sys.executable, "-m", "megdet_hpc.experiments.parity", "--reference-folder", str(folder)]
    argv += ["--seed", str(seed), "--config", str(config), "--epochs", str(plan.epochs)]
    argv += ["--step-epoch", str(plan.step_epoch), "--threads", str(threads)]
    argv += ["--train-images", str(plan.train_images), *opts]
    start = time.perf_counter()
    with open(folder / "stdout.log", "a") as log:
        code = subprocess.run(argv, stdout=log, stderr=subprocess.STDOUT).returncode
    state["wall_s"] = state.get("wall_s", 0.0) + time.perf_counter() - start
    state["exit_code"] = code
    state["status"] = "done" if code == EXIT_OK else "diverged" if code == EXIT_NONFINITE else "failed"
    (folder / "experiment.json").write_text(json.dumps(state))
    print(f"[parity] torchvision, seed {seed}: {state['status']} after {state['wall_s']:.0f} s", flush=True)
    return state


def _rows(folder: Path) -> list[dict[str, Any]]:
    path = folder / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _ms_per_image(train: list[dict[str, Any]]) -> float | None:
    rates = [r["images_per_s"] for r in train if r.get("images_per_s")]
    rates = rates[len(rates) // 5 :] or rates  # skip the start-up windows, as megdet_table does
    return 1000.0 / statistics.median(rates) if rates else None


def read_outcome(system: str, seed: int, folder: Path, plan: Plan) -> Outcome:
    state = _state(folder)
    out = Outcome(system, seed, state.get("status", "pending"), state.get("wall_s", 0.0))
    rows = _rows(folder)
    train = [r for r in rows if "loss" in r]
    if system == "megdet_hpc":  # metrics.jsonl: training windows ("lr") and evaluations ("iteration", "AP")
        train = [r for r in rows if "lr" in r and "AP" not in r]
        evals = [
            {"images_seen": r["iteration"] * plan.batch, **{k: r[k] for k in ("AP", "AP50", "AP75")}}
            for r in rows
            if "AP" in r
        ]
    else:
        evals = [r for r in rows if "AP" in r]
    out.evals = sorted({e["images_seen"]: e for e in evals}.values(), key=lambda e: e["images_seen"])
    out.ms_per_image = _ms_per_image(train)
    out.curves = {"images_seen": [r["images_seen"] for r in train], "loss": [r["loss"] for r in train]}
    # megdet_hpc's "loss" is the logged iteration's own loss; the reference records that as "loss_step"
    # (runs from before it did not), beside its mean over the window.
    if system == "megdet_hpc":
        out.curves["loss_step"] = out.curves["loss"]
    elif train and all("loss_step" in r for r in train):
        out.curves["loss_step"] = [r["loss_step"] for r in train]
    final = folder / "eval" / "metrics.json"
    if out.status == "done" and final.is_file():
        m = json.loads(final.read_text())
        out.AP, out.AP50, out.AP75 = m["AP"], m["AP50"], m["AP75"]
    return out


def spread(values: list[float]) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation (None with fewer than 2 values)."""
    if not values:
        return None, None
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None


def summary(outcomes: list[Outcome]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for system in SYSTEMS:
        done = [o for o in outcomes if o.system == system and o.status == "done"]
        row: dict[str, Any] = {"seeds": [o.seed for o in done]}
        for key in ("AP", "AP50", "AP75", "ms_per_image", "wall_s"):
            values = [getattr(o, key) for o in done if getattr(o, key) is not None]
            row[key] = dict(zip(("mean", "std"), spread(values)))
        out[system] = row
    return out


def verdict(stats: dict[str, dict[str, Any]]) -> str:
    a, b = stats["megdet_hpc"]["AP"], stats["torchvision"]["AP"]
    if a["mean"] is None or b["mean"] is None:
        return "no verdict: a system has no finished run"
    if a["std"] is None or b["std"] is None:
        return "no verdict: fewer than 2 finished seeds for a system (no spread to compare with)"
    word, diff, tolerance = compare(a["mean"], a["std"], b["mean"], b["std"])
    text = f"megdet_hpc - torchvision = {diff:+.4f} AP; seed spread (larger std) {tolerance:.4f}: "
    if word == "parity":
        return text + "**parity** (the means are within the seed spread)"
    return text + f"**megdet_hpc is {word}**"


def partial_verdict(outcomes: list[Outcome]) -> str | None:
    """The verdict at the last evaluation point every run reached, while some run is unfinished."""
    if all(o.status == "done" for o in outcomes):
        return None
    reached = [{e["images_seen"] for e in o.evals} for o in outcomes]
    common = set.intersection(*reached) if reached and all(reached) else set()
    if not common:
        return "no partial verdict: no evaluation point that every run reached"
    n = max(common)
    stats = []
    for system in SYSTEMS:
        values = [e["AP"] for o in outcomes if o.system == system for e in o.evals if e["images_seen"] == n]
        stats.append(spread(values))
    (mean_a, std_a), (mean_b, std_b) = stats
    if std_a is None or std_b is None:
        return f"no partial verdict at {n} images: fewer than 2 seeds"
    word, diff, tolerance = compare(mean_a, std_a, mean_b, std_b)
    outcome = "**parity** (within the seed spread)" if word == "parity" else f"**megdet_hpc is {word}**"
    return (
        f"at {n} images, the last evaluation every run reached: megdet_hpc {mean_a:.4f} +- {std_a:.4f}, "
        f"torchvision {mean_b:.4f} +- {std_b:.4f}, difference {diff:+.4f} AP vs spread {tolerance:.4f}: {outcome}"
    )


def loss_comparison(outcomes: list[Outcome], plan: Plan) -> str | None:
    """Mean training loss per run over the images every run has trained (after the first window), per
    system.  Like for like when every run records the logged iterations' own losses ("loss_step");
    otherwise megdet_hpc's (one iteration per window) against the reference's window means, said so."""
    ends = [max(o.curves["images_seen"]) for o in outcomes if o.curves.get("images_seen")]
    if len(ends) < len(outcomes) or not ends:
        return None
    end, start = min(ends), WINDOW * plan.batch
    key = "loss_step" if all("loss_step" in o.curves for o in outcomes) else "loss"
    stats = []
    for system in SYSTEMS:
        per_run = []
        for o in outcomes:
            window = [
                loss
                for n, loss in zip(o.curves["images_seen"], o.curves[key])
                if start < n <= end and math.isfinite(loss)
            ]
            if o.system == system and window:
                per_run.append(statistics.fmean(window))
        stats.append(spread(per_run))
    (mean_a, std_a), (mean_b, std_b) = stats
    if mean_a is None or mean_b is None or std_a is None or std_b is None:
        return None
    word, diff, tolerance = compare(mean_a, std_a, mean_b, std_b)
    word = {"better": "higher", "worse": "lower"}.get(word, word)  # for a loss, say which way
    what = (
        f"the loss of every {WINDOW}th iteration"
        if key == "loss_step"
        else f"megdet_hpc: the loss of every {WINDOW}th iteration, torchvision: the mean over each {WINDOW}"
    )
    return (
        f"training loss over images ({start}, {end}] ({what}): megdet_hpc {mean_a:.3f} +- {std_a:.3f}, torchvision "
        f"{mean_b:.3f} +- {std_b:.3f}, difference {diff:+.3f} vs spread {tolerance:.3f}: "
        + ("within the seed spread" if word == "parity" else f"megdet_hpc's is {word}")
    )


def compare(mean_a: float, std_a: float, mean_b: float, std_b: float) -> tuple[str, float, float]:
    """parity when the means differ by no more than the larger seed standard deviation."""
    diff, tolerance = mean_a - mean_b, max(std_a, std_b)
    return ("parity" if abs(diff) <= tolerance else "better" if diff > 0 else "worse"), diff, tolerance


def _pm(stat: dict[str, float | None], digits: int = 3) -> str:
    if stat["mean"] is None:
        return "-"
    std = "n/a" if stat["std"] is None else f"{stat['std']:.{digits}f}"
    return f"{stat['mean']:.{digits}f} +- {std}"


def markdown(outcomes: list[Outcome], plan: Plan) -> str:
    stats = summary(outcomes)
    lines = [
        f"Demo detector (ResNet-18 FPN from scratch, {plan.size} px, embedded data), {plan.images} training images "
        f"({plan.epochs} epochs of {plan.train_images}) at batch {plan.batch}: LR {plan.lr:g}, linear warmup "
        f"from 1/1000 over {plan.warmup_iters} iterations, x0.1 after epoch {plan.step_epoch}; COCO AP on the "
        f"{plan.val_images} validation images (megdet_hpc.evaluation, pycocotools). Mean +- sample standard deviation over seeds.",
        "",
        "| system | seeds | AP | AP50 | AP75 | ms / image (training) | wall time / run (s) |",
        "|---|---|---|---|---|---|---|",
    ]
    for system in SYSTEMS:
        s = stats[system]
        lines.append(
            f"| {LABELS[system]} | {len(s['seeds'])} | {_pm(s['AP'])} | {_pm(s['AP50'])} | {_pm(s['AP75'])} | "
            f"{_pm(s['ms_per_image'], 1)} | {_pm(s['wall_s'], 0)} |"
        )
    lines += [
        "",
        f"Verdict: {verdict(stats)}.",
        *(
            []
            if partial_verdict(outcomes) is None
            else ["", f"Partial verdict: {partial_verdict(outcomes)}."]
        ),
        *(
            []
            if loss_comparison(outcomes, plan) is None
            else ["", f"Loss: {loss_comparison(outcomes, plan)}."]
        ),
        "",
        "AP after each epoch (mean +- std over the seeds evaluated there, unfinished runs included; "
        "n = number of seeds):",
        "",
    ]
    points = sorted({e["images_seen"] for o in outcomes for e in o.evals})
    lines.append("| images seen | " + " | ".join(SYSTEMS) + " | megdet_hpc - torchvision | within spread |")
    lines.append("|---" * (len(SYSTEMS) + 3) + "|")
    for n in points:
        cells, stats_at = [], []
        for system in SYSTEMS:
            values = [
                e["AP"] for o in outcomes if o.system == system for e in o.evals if e["images_seen"] == n
            ]
            stat = dict(zip(("mean", "std"), spread(values)))
            stats_at.append(stat)
            cells.append(f"{_pm(stat)} (n={len(values)})")
        a, b = stats_at
        if a["std"] is not None and b["std"] is not None:
            word, diff, _ = compare(a["mean"], a["std"], b["mean"], b["std"])
            cells += [f"{diff:+.3f}", "yes" if word == "parity" else f"no ({word})"]
        else:
            cells += ["-", "-"]
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Every run:",
        "",
        "| system | seed | status | AP | AP50 | AP75 | ms / image | wall time (s) |",
    ]
    lines.append("|---|---|---|---|---|---|---|---|")
    for o in outcomes:
        cells = [("-" if v is None else f"{v:.3f}") for v in (o.AP, o.AP50, o.AP75)]
        ms = "-" if o.ms_per_image is None else f"{o.ms_per_image:.1f}"
        lines.append(f"| {o.system} | {o.seed} | {o.status} | {' | '.join(cells)} | {ms} | {o.wall_s:.0f} |")
    return "\n".join(lines) + "\n"


def plot(outcomes: list[Outcome], path: Path) -> Path:
    from megdet_hpc.utils.plotting import pyplot, save

    plt = pyplot()

    fig, (ax, loss_ax) = plt.subplots(1, 2, figsize=(11, 4))
    for color, system in zip(("C0", "C1"), SYSTEMS):
        trained = [o for o in outcomes if o.system == system and o.curves.get("loss")]
        by_point: dict[int, list[float]] = {}
        for o in trained:
            for n, loss in zip(o.curves["images_seen"], o.curves["loss"]):
                by_point.setdefault(n, []).append(loss)
        xs = sorted(by_point)
        if xs:
            loss_ax.plot(xs, [statistics.fmean(by_point[n]) for n in xs], color=color, lw=1.2, label=system)
            low = [min(by_point[n]) for n in xs]
            loss_ax.fill_between(xs, low, [max(by_point[n]) for n in xs], color=color, alpha=0.15)
        runs = [o for o in outcomes if o.system == system and o.evals]
        for o in runs:
            xs = [e["images_seen"] for e in o.evals]
            ax.plot(xs, [e["AP"] for e in o.evals], color=color, lw=0.7, alpha=0.35)
        if runs:
            draw_ap(ax, ap_by_point([o.evals for o in runs]), color, f"{LABELS[system]}, {len(runs)} seeds")
    label_ap_axes(ax, "AP vs images seen (mean +- std over seeds; thin: each seed)")
    loss_ax.set_xlabel("images seen")
    loss_ax.set_ylabel("training loss")
    loss_ax.set_title(
        f"training loss, mean over seeds (band: min-max)\nmegdet_hpc: every {WINDOW}th iteration; "
        f"torchvision: mean of each {WINDOW}",
        fontsize=9,
    )
    loss_ax.grid(alpha=0.3)
    if loss_ax.get_legend_handles_labels()[0]:
        loss_ax.legend(fontsize=7)
    return save(fig, path)


def ap_by_point(evals: list[list[dict[str, float]]]) -> dict[int, list[float]]:
    """AP per evaluation point (images seen), over runs (each a list of evaluations)."""
    points: dict[int, list[float]] = {}
    for run in evals:
        for e in run:
            points.setdefault(int(e["images_seen"]), []).append(e["AP"])
    return points


def draw_ap(ax: Any, points: dict[int, list[float]], color: str, label: str) -> None:
    """Mean AP with the seed standard deviation as error bars."""
    xs = sorted(points)
    stats = [spread(points[n]) for n in xs]
    ax.errorbar(
        xs,
        [m for m, _ in stats],
        yerr=[s or 0.0 for _, s in stats],
        color=color,
        marker="o",
        capsize=3,
        label=label,
    )


def label_ap_axes(ax: Any, title: str) -> None:
    ax.set_xlabel("images seen")
    ax.set_ylabel("COCO AP (val)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7, loc="upper left")


def run_experiment(
    plan: Plan,
    seeds: tuple[int, ...],
    out: Path,
    results: Path,
    data: Path,
    config: Path,
    threads: int = 2,
    systems: tuple[str, ...] = SYSTEMS,
    user_opts: tuple[str, ...] = (),
    parallel: int = 1,
    report_only: bool = False,
) -> int:
    """Train (or resume, or skip) every (seed, system) run, then write the table, JSON and plot
    (``report_only``: only write them, from the run folders as they are)."""
    from megdet_hpc.experiments.megdet_table import BASE_BATCH, slug
    from megdet_hpc.utils.provenance import environment

    if plan.batch != BASE_BATCH:  # megdet_table.train_command writes the schedule at its base batch
        raise UserError(f"solver.total_batch={plan.batch}: the parity experiment trains batch {BASE_BATCH}")

    opts = data_opts(data, user_opts)

    def one(job: tuple[int, str]) -> None:
        seed, system = job
        if system == "megdet_hpc":
            execute_megdet(seed, plan, out, data, config, opts)
        else:
            execute_reference(out / slug(run_name(system, seed)), config, opts, seed, plan, threads)

    # Seed by seed (an interrupted experiment has comparable partial results); with ``parallel`` 2 the
    # two systems of a seed train at the same time, under the same load.
    jobs = [] if report_only else [(seed, system) for seed in seeds for system in systems]
    if parallel <= 1:
        for job in jobs:
            one(job)
    else:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(parallel) as pool:
            list(pool.map(one, jobs))
    outcomes = [read_outcome(s, seed, out / slug(run_name(s, seed)), plan) for seed in seeds for s in SYSTEMS]
    results.mkdir(parents=True, exist_ok=True)
    table = markdown(outcomes, plan)
    (results / "parity.md").write_text(table)
    doc = {
        "plan": {**asdict(plan), "warmup_iters": plan.warmup_iters, "images": plan.images},
        "labels": LABELS,
        "summary": summary(outcomes),
        "verdict": verdict(summary(outcomes)),
        "partial_verdict": partial_verdict(outcomes),
        "loss_comparison": loss_comparison(outcomes, plan),
        "env": environment(),
        "runs": [asdict(o) for o in outcomes],
    }
    (results / "parity.json").write_text(json.dumps(doc, indent=1))
    figure = plot(outcomes, results / "parity_ap_vs_images.png")
    print(table)
    print("wrote", results / "parity.md", results / "parity.json", figure, flush=True)
    return 0 if report_only or all(o.status in ("done", "diverged") for o in outcomes) else 1


def data_opts(data: Path, user_opts: tuple[str, ...] = ()) -> list[str]:
    """Config overrides of both systems: the generated data first, then the user's overrides."""
    return [
        f"data.train_images={data}/train",
        f"data.train_annotations={data}/annotations/instances_train.json",
        f"data.val_images={data}/val",
        f"data.val_annotations={data}/annotations/instances_val.json",
        *user_opts,
    ]


def execute_megdet(
    seed: int,
    plan: Plan,
    out: Path,
    data: Path,
    config: Path,
    opts: list[str],
    system: str = "megdet_hpc",
    ranks: int = 2,
) -> dict[str, Any]:
    """One megdet_hpc run on ``plan`` (``ranks`` x the batch's share, CGBN over all of it, the reference's
    warmup and LR step, an evaluation per epoch), resumable; its folder is ``slug(run_name(system, seed))``."""
    from megdet_hpc.experiments.megdet_table import Run, execute

    run = Run(run_name(system, seed), ranks, plan.batch // ranks, "cgbn", 0, True, seed=seed)
    schedule = [
        f"solver.warmup_iters={plan.warmup_iters}",
        f"solver.steps=[{plan.step_epoch * plan.iters_per_epoch}]",
        f"train.eval_period={plan.iters_per_epoch}",
        "eval.vis_images=0",
    ]
    return execute(run, plan.images, out, data, config, plan.lr, [*schedule, *opts], tag="parity")


def resolve_config(config: Path | None) -> Path:
    from megdet_hpc.config import bundled_configs

    return (config or bundled_configs() / "demo_cpu.yaml").resolve()


def schedule(config: Path, opts: list[str], train_images: int, epochs: int, step_epoch: int) -> Plan:
    """The shared schedule from the config (LR by the linear scaling rule at its total batch)."""
    from megdet_hpc.config import load_config

    if not 0 < step_epoch < epochs:
        raise UserError(f"--step-epoch must be in 1..{epochs - 1}")
    s = load_config(config, opts).solver
    return Plan(train_images, s.total_batch, s.base_lr * s.total_batch / s.base_batch, epochs, step_epoch)


def prepare(
    config: Path,
    opts: list[str],
    epochs: int,
    step_epoch: int,
    data: Path,
    train_images: int,
    val_images: int,
    size: int,
) -> tuple[Plan, Path]:
    """The plan and the generated data set (made once; the same for the same sizes)."""
    from megdet_hpc.data.coco import CocoDetection
    from megdet_hpc.data.synthetic import generate

    plan = schedule(config, opts, train_images, epochs, step_epoch)
    folder = generate(data.resolve(), train_images, val_images, size, 0)
    train_set = CocoDetection(folder / "train", folder / "annotations" / "instances_train.json", train=True)
    # images without boxes are skipped for training
    return replace(plan, train_images=len(train_set), val_images=val_images, size=size), folder


def run_name(system: str, seed: int) -> str:
    """A run's name; its folder is ``slug(name)`` under ``--out`` (megdet_table's naming)."""
    return f"{system}, seed {seed}"


def main(argv: list[str] | None = None) -> int:
    p = ArgumentParser(prog="megdet_hpc.experiments.parity", description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=3, help="epochs of the training set per run")
    p.add_argument(
        "--report-only", action="store_true", help="write the table from the run folders, train nothing"
    )
    p.add_argument("--parallel", type=int, default=2, help="runs at a time (2: both systems of a seed)")
    p.add_argument("--step-epoch", type=int, default=2, help="LR x0.1 from this epoch on")
    p.add_argument("--seeds", type=int, nargs="+", default=list(SEEDS))
    p.add_argument("--threads", type=int, default=2, help="torch threads of the one reference process")
    p.add_argument("--out", type=Path, default=Path("output/experiments/parity"), help="run folders")
    p.add_argument(
        "--results",
        type=Path,
        default=Path("experiments/results"),
        help="table and plot (default: experiments/results under the current directory)",
    )
    p.add_argument("--data", type=Path, default=Path("datasets/synthetic_parity"))
    p.add_argument("--config", type=Path, help="detector config (default: the bundled demo_cpu.yaml)")
    p.add_argument(
        "--train-images", type=int, default=202, help="generated training images (202: 200 with boxes)"
    )
    p.add_argument("--val-images", type=int, default=100, help="size of the generated validation set")
    p.add_argument("--size", type=int, default=128, help="generated image size (px)")
    p.add_argument("--reference-folder", type=Path, help=argparse_suppress())  # one reference run
    p.add_argument("--seed", type=int, default=0, help=argparse_suppress())
    p.add_argument("opts", nargs="*", help="config overrides for both systems, section.key=value")
    a = p.parse(argv)

    def _run() -> int:
        config = resolve_config(a.config)
        if a.reference_folder is not None:
            plan = schedule(config, a.opts, a.train_images, a.epochs, a.step_epoch)
            return reference_train(a.reference_folder, config, a.opts, a.seed, plan, a.threads)
        plan, data = prepare(
            config, a.opts, a.epochs, a.step_epoch, a.data, a.train_images, a.val_images, a.size
        )
        return run_experiment(
            plan,
            tuple(a.seeds),
            a.out.resolve(),
            a.results,
            data,
            config,
            a.threads,
            user_opts=tuple(a.opts),
            parallel=a.parallel,
            report_only=a.report_only,
        )

    return run_cli(_run, "megdet_hpc.experiments.parity")


def argparse_suppress() -> str:
    import argparse

    return argparse.SUPPRESS


if __name__ == "__main__":
    sys.exit(main())
