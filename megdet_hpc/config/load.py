"""Load, merge, override and validate configs.

YAML files may inherit with ``_base_: other.yaml`` (relative to the file); command-line overrides are
``section.key=value``.  Every problem is a ``ConfigError`` with a one-line message naming the key.

Two YAML surprises are removed on purpose:
* scalars follow YAML 1.2: ``1e-4`` is a number, ``0123`` is 123 (not octal 83), ``yes``/``on`` and
  ``2024-01-01`` are strings;
* an override of a string-typed key is taken literally (``train.output_dir=/runs/exp #2`` is that
  path; YAML would have read `` #2`` as a comment and trained in ``/runs/exp``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import re
import typing
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from megdet_hpc.config.batch import BatchPlan
from megdet_hpc.config.errors import ConfigError
from megdet_hpc.config.rules import is_architecture, rules_of
from megdet_hpc.config.schema import Config, ModelConfig

__all__ = ["ConfigError"]  # re-exported: ``from megdet_hpc.config.load import ConfigError`` keeps working


# -- YAML with YAML 1.2 scalars -------------------------------------------------------------------
class _Loader(yaml.SafeLoader):
    pass


_REPLACED = {f"tag:yaml.org,2002:{kind}" for kind in ("bool", "int", "float", "timestamp")}
_Loader.yaml_implicit_resolvers = {
    first: [r for r in found if r[0] not in _REPLACED]
    for first, found in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:int", re.compile(r"^(?:[-+]?[0-9]+|0o[0-7]+|0x[0-9a-fA-F]+)$"), list("-+0123456789")
)
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"^(?:[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"
    ),
    list("-+0123456789."),
)


def _construct_int(loader: yaml.SafeLoader, node: yaml.ScalarNode) -> int:
    text = str(loader.construct_scalar(node))
    if text.startswith(("0o", "0x")):
        return int(text, 0)
    return int(text, 10)


_Loader.add_constructor("tag:yaml.org,2002:int", _construct_int)


def yaml_load(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass


# -- files ----------------------------------------------------------------------------------------
def bundled_configs() -> Path:
    """The configs shipped inside the package (the repository's ``configs/``)."""
    return Path(str(resources.files("megdet_hpc") / "configs"))


def resolve_config_path(path: str | Path) -> Path:
    """``path`` if it exists, else the bundled config of that name (a wheel install has no checkout)."""
    given = Path(path)
    if given.exists():
        return given
    bundled = bundled_configs() / given.name
    if given.parent in (Path("."), Path("configs")) and bundled.is_file():
        return bundled
    return given


def default_config_name(total_batch: int) -> str:
    """The file name of the config a launch without ``--config`` uses (the rule, in one place): the
    MegDet 256-image config for a total batch of 256, the 16-image baseline otherwise (its schedule is
    then rescaled in images to the actual batch)."""
    return "megdet_r50_fpn_bs256.yaml" if total_batch == 256 else "megdet_r50_fpn_bs16.yaml"


def default_config_for(total_batch: int) -> Path:
    """The bundled config of ``default_config_name`` (the package's copy: no checkout needed)."""
    return bundled_configs() / default_config_name(total_batch)


def _read_yaml(path: Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    if path.is_dir():
        raise ConfigError(f"config {path} is a directory, not a YAML file")
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    if path.resolve() in seen:
        raise ConfigError(f"config inheritance loop through {path}")
    try:
        data = yaml_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot be read ({exc})") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping, got {type(data).__name__}")
    base = data.pop("_base_", None)
    if base is None:
        return data
    if not isinstance(base, str) or not base:
        raise ConfigError(f"{path}: _base_ must be a file name, got {base!r}")
    merged = _read_yaml(path.parent / base, (*seen, path.resolve()))
    return _deep_merge(merged, data)


def _deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


# -- overrides ------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class _Raw:
    """An override's text, interpreted once its key's type is known."""

    text: str


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``["solver.base_lr=0.01", ...]`` -> nested dict of raw values (typed by ``from_dict``)."""
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form section.key=value")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        if any(not p for p in parts):
            raise ConfigError(f"override {item!r}: empty key")
        node = out
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {item!r}: {part} is not a section")
            node = child
        node[parts[-1]] = _Raw(raw)
    return out


def _parse_raw(raw: _Raw, key: str) -> Any:
    if raw.text == "":
        return ""
    try:
        return yaml_load(raw.text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {key}: cannot parse value {raw.text!r}") from exc


# -- typing ---------------------------------------------------------------------------------------
def _coerce(value: Any, hint: Any, key: str) -> Any:
    if isinstance(value, _Raw):
        value = value.text if hint is str else _parse_raw(value, key)
    origin = typing.get_origin(hint)
    if origin is tuple:  # a list in YAML and in to_dict, a tuple in the frozen config
        inner, _ = typing.get_args(hint)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return tuple(_coerce(v, inner, f"{key}[{i}]") for i, v in enumerate(value))
    if hint is float:
        if isinstance(value, str):
            with contextlib.suppress(ValueError):
                value = float(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        if not math.isfinite(value):
            raise ConfigError(f"{key}: expected a finite number, got {value!r}")
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
    """Plain nested dicts with lists (as YAML and every checkpoint hold them)."""
    return dataclasses.asdict(cfg, dict_factory=lambda items: {k: _plain(v) for k, v in items})


def _plain(value: Any) -> Any:
    return [_plain(v) for v in value] if isinstance(value, (list, tuple)) else value


def updated(cfg: Config, changes: dict[str, dict[str, Any]]) -> Config:
    """A new config with ``{"section": {"key": value}}`` applied (validated); ``cfg`` is unchanged."""
    new = from_dict(_deep_merge(to_dict(cfg), changes))
    validate(new)
    return new


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> Config:
    """Read ``path`` (or defaults), apply overrides, validate; raises ConfigError."""
    data = _read_yaml(resolve_config_path(path)) if path else {}
    data = _deep_merge(data, parse_overrides(overrides or []))
    cfg = from_dict(data)
    validate(cfg)
    return cfg


# -- validation -----------------------------------------------------------------------------------
def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def validate(cfg: Config, world_size: int | None = None) -> None:
    """Every check that needs no data: types are already right; each key's own rules (declared in
    the schema), then the rules relating several keys.  With ``world_size`` also the batch arithmetic
    of this job."""
    for section in dataclasses.fields(cfg):
        values = getattr(cfg, section.name)
        for f in dataclasses.fields(values):
            for rule in rules_of(f):
                message = rule.error(f"{section.name}.{f.name}", getattr(values, f.name))
                if message is not None:
                    raise ConfigError(message)
    m, s = cfg.model, cfg.solver
    _check(
        not ("box_head" in m.cgbn_where and m.norm == "cgbn" and m.box_head_convs <= 0),
        "model.cgbn_where has box_head but model.box_head_convs is 0 (no norm layers)",
    )
    _check(
        m.min_size <= m.max_size,
        f"model.min_size={m.min_size} is larger than model.max_size={m.max_size}",
    )
    _check(
        not (s.fp16_compression and s.grad_sync == "after_backward"),
        "solver.fp16_compression needs solver.grad_sync=overlap or auto (Horovod's optimizer)",
    )
    if world_size is not None:
        BatchPlan(world_size, cfg.data.images_per_gpu, s.grad_accum).check(s.total_batch)
        _check(
            not (m.norm == "cgbn" and m.bn_group_size and world_size % m.bn_group_size),
            f"model.bn_group_size={m.bn_group_size} must divide the world size {world_size}",
        )


def scale_to_total_batch(cfg: Config, total: int) -> Config:
    """The config re-expressed for another total batch, in images (detectron2's auto_scale_workers).

    The number of images of the run, of the warmup and at each LR step stay what the config says for
    its own ``solver.total_batch``; iteration counts scale by ``old / total``.  The LR itself follows
    the linear scaling rule at run time (``LRSchedule.lr``), so it is not touched here.
    """
    s, t = cfg.solver, cfg.train
    _check(total > 0, f"--total-batch must be > 0, got {total}")
    if total == s.total_batch:
        return cfg
    ratio = s.total_batch / total
    return updated(
        cfg,
        {
            "solver": {
                "max_iter": max(1, math.ceil(s.max_iter * ratio)),
                "warmup_iters": round(s.warmup_iters * ratio),
                "steps": [max(1, round(step * ratio)) for step in s.steps],
                "total_batch": total,
            },
            "train": {
                "checkpoint_period": max(1, round(t.checkpoint_period * ratio)) if t.checkpoint_period else 0,
                "eval_period": max(1, round(t.eval_period * ratio)) if t.eval_period else 0,
            },
        },
    )


# Keys whose change makes a checkpoint's weights unusable (different tensors or shapes).
ARCHITECTURE_KEYS = tuple(f.name for f in dataclasses.fields(ModelConfig) if is_architecture(f))


def architecture_differences(saved: dict[str, Any], cfg: Config) -> list[str]:
    """``model.key: saved -> now`` for every architecture key that differs from a checkpoint's config."""
    old = saved.get("model", {}) if isinstance(saved, dict) else {}
    now = to_dict(cfg)["model"]
    return [
        f"model.{k}: {old[k]!r} -> {now[k]!r}" for k in ARCHITECTURE_KEYS if k in old and old[k] != now[k]
    ]
