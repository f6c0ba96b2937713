"""Load, merge, override and validate configs.

YAML files may inherit with ``_base_: other.yaml`` (relative path); command-line overrides are
``section.key=value`` with YAML-typed values (``solver.steps=[100,200]``).  Every problem is a
``ConfigError`` with a one-line message naming the key.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any

from megdet_hpc.config.schema import Config

BACKBONES = ("resnet18", "resnet34", "resnet50", "resnet101")
NORMS = ("cgbn", "bn", "frozen")
CGBN_PLACES = ("backbone", "fpn", "box_head")
GRAD_SYNCS = ("auto", "overlap", "after_backward")


class ConfigError(ValueError):
    """An invalid configuration, with a one-line message naming the key."""


def _read_yaml(path: Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    import yaml

    if path.resolve() in seen:
        raise ConfigError(f"config inheritance loop through {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping, got {type(data).__name__}")
    base = data.pop("_base_", None)
    if base is None:
        return data
    merged = _read_yaml((path.parent / base), (*seen, path.resolve()))
    return _deep_merge(merged, data)


def _deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``["solver.base_lr=0.01", ...]`` -> nested dict."""
    import yaml

    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form section.key=value")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError as exc:
            raise ConfigError(f"override {key}: cannot parse value {raw!r}") from exc
        node = out
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return out


def _coerce(value: Any, hint: Any, key: str) -> Any:
    origin = typing.get_origin(hint)
    if origin is list:
        (inner,) = typing.get_args(hint)
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_coerce(v, inner, f"{key}[{i}]") for i, v in enumerate(value)]
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true/false, got {value!r}")
        return value
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    if isinstance(hint, types.UnionType):  # pragma: no cover - not used by the schema yet
        return value
    raise ConfigError(f"{key}: unsupported type {hint}")


def _build(cls: type, data: dict[str, Any], prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"unknown config key {prefix}{unknown[0]} (known: {', '.join(sorted(names))})")
    kwargs = {}
    for name in names & set(data):
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            if not isinstance(data[name], dict):
                raise ConfigError(f"{prefix}{name}: expected a mapping")
            kwargs[name] = _build(hint, data[name], f"{prefix}{name}.")
        else:
            kwargs[name] = _coerce(data[name], hint, f"{prefix}{name}")
    return cls(**kwargs)


def from_dict(data: dict[str, Any]) -> Config:
    return _build(Config, data, "")


def to_dict(cfg: Config) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> Config:
    """Read ``path`` (or defaults), apply overrides, validate; raises ConfigError."""
    data = _read_yaml(Path(path)) if path else {}
    data = _deep_merge(data, parse_overrides(overrides or []))
    cfg = from_dict(data)
    validate(cfg)
    return cfg


def validate(cfg: Config, world_size: int | None = None) -> None:
    """Cross-field checks.  With ``world_size`` also the batch arithmetic of this job."""
    m, s, d, t = cfg.model, cfg.solver, cfg.data, cfg.train
    if m.backbone not in BACKBONES:
        raise ConfigError(f"model.backbone={m.backbone!r} is not one of {', '.join(BACKBONES)}")
    if m.norm not in NORMS:
        raise ConfigError(f"model.norm={m.norm!r} is not one of {', '.join(NORMS)}")
    for place in m.cgbn_where:
        if place not in CGBN_PLACES:
            raise ConfigError(f"model.cgbn_where: {place!r} is not one of {', '.join(CGBN_PLACES)}")
    if "box_head" in m.cgbn_where and m.norm == "cgbn" and m.box_head_convs <= 0:
        raise ConfigError("model.cgbn_where has box_head but model.box_head_convs is 0 (no norm layers)")
    positive = {
        "model.num_classes": m.num_classes,
        "model.min_size": m.min_size,
        "model.max_size": m.max_size,
        "data.images_per_gpu": d.images_per_gpu,
        "solver.base_batch": s.base_batch,
        "solver.total_batch": s.total_batch,
        "solver.grad_accum": s.grad_accum,
        "solver.max_iter": s.max_iter,
        "train.keep_checkpoints": t.keep_checkpoints,
    }
    for key, value in positive.items():
        if value <= 0:
            raise ConfigError(f"{key} must be > 0, got {value}")
    if s.base_lr <= 0:
        raise ConfigError(f"solver.base_lr must be > 0, got {s.base_lr}")
    if not 0 < s.warmup_factor <= 1:
        raise ConfigError(f"solver.warmup_factor must be in (0, 1], got {s.warmup_factor}")
    if s.warmup_iters < 0:
        raise ConfigError(f"solver.warmup_iters must be >= 0, got {s.warmup_iters}")
    if list(s.steps) != sorted(s.steps) or any(step <= 0 for step in s.steps):
        raise ConfigError(f"solver.steps must be increasing positive iterations, got {s.steps}")
    if m.bn_group_size < 0:
        raise ConfigError(f"model.bn_group_size must be >= 0, got {m.bn_group_size}")
    if not 0 <= d.flip_prob <= 1:
        raise ConfigError(f"data.flip_prob must be in [0, 1], got {d.flip_prob}")
    if s.grad_sync not in GRAD_SYNCS:
        raise ConfigError(f"solver.grad_sync={s.grad_sync!r} is not one of {', '.join(GRAD_SYNCS)}")
    if s.fp16_compression and s.grad_sync == "after_backward":
        raise ConfigError(
            "solver.fp16_compression needs solver.grad_sync=overlap or auto (Horovod's optimizer)"
        )
    if t.device not in ("auto", "cpu", "cuda"):
        raise ConfigError(f"train.device={t.device!r} is not one of auto, cpu, cuda")
    if world_size is not None:
        per_step = world_size * d.images_per_gpu * s.grad_accum
        if per_step != s.total_batch:
            raise ConfigError(
                f"solver.total_batch={s.total_batch} != world size {world_size} x data.images_per_gpu "
                f"{d.images_per_gpu} x solver.grad_accum {s.grad_accum} = {per_step}"
            )
        if m.norm == "cgbn" and m.bn_group_size and world_size % m.bn_group_size:
            raise ConfigError(
                f"model.bn_group_size={m.bn_group_size} must divide the world size {world_size}"
            )


def scale_to_total_batch(cfg: Config, total: int) -> Config:
    """Re-express the schedule for another total batch, in images (detectron2's auto_scale_workers).

    The number of images of the run, of the warmup and at each LR step stay what the config says for
    its own ``solver.total_batch``; iteration counts scale by ``old / total``.  The LR itself follows
    the linear scaling rule at run time (``LRSchedule.lr``), so it is not touched here.
    """
    import math

    s = cfg.solver
    if total <= 0:
        raise ConfigError(f"--total-batch must be > 0, got {total}")
    if total == s.total_batch:
        return cfg
    ratio = s.total_batch / total
    s.max_iter = max(1, math.ceil(s.max_iter * ratio))
    s.warmup_iters = round(s.warmup_iters * ratio)
    s.steps = [max(1, round(step * ratio)) for step in s.steps]
    s.total_batch = total
    t = cfg.train
    t.checkpoint_period = max(1, round(t.checkpoint_period * ratio)) if t.checkpoint_period else 0
    t.eval_period = max(1, round(t.eval_period * ratio)) if t.eval_period else 0
    validate(cfg)
    return cfg
