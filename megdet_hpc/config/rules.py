"""The constraints a config key declares next to its field in ``schema.py``.

``key(default, *rules, architecture=False)`` is a dataclass ``field`` whose metadata holds the rules
(each a ``Rule``: the test and the one-line message when it fails) and whether the key shapes the
model's tensors.  ``validate`` in ``load.py`` runs every field's rules in declaration order, then the
few rules that relate several keys; ``ARCHITECTURE_KEYS`` is read from the same metadata.
"""

from __future__ import annotations

import dataclasses
import signal
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Rule:
    """``ok(value)`` or the message ``fail(key, value)``; ``allowed`` is the choice list, if any."""

    ok: Callable[[Any], bool]
    fail: Callable[[str, Any], str]
    allowed: tuple[str, ...] = ()

    def error(self, key: str, value: Any) -> str | None:
        return None if self.ok(value) else self.fail(key, value)


def key(default: Any, *rules: Rule, architecture: bool = False) -> Any:
    """A field with its default (immutable: a tuple for a list), its rules and whether a checkpoint's
    weights depend on it."""
    return dataclasses.field(default=default, metadata={"rules": rules, "architecture": architecture})


def rules_of(f: dataclasses.Field) -> tuple[Rule, ...]:
    return f.metadata.get("rules", ())


def is_architecture(f: dataclasses.Field) -> bool:
    return bool(f.metadata.get("architecture", False))


# -- the rules ------------------------------------------------------------------------------------
def _listed(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def choice(*allowed: str) -> Rule:
    """One of ``allowed``."""
    names = ", ".join(allowed)
    return Rule(lambda v: v in allowed, lambda k, v: f"{k}={v!r} is not one of {names}", allowed)


def each_choice(*allowed: str) -> Rule:
    """A list whose every item is one of ``allowed``."""
    names = ", ".join(allowed)

    def fail(k: str, v: Any) -> str:
        bad = next(item for item in v if item not in allowed)
        return f"{k}: {bad!r} is not one of {names}"

    return Rule(lambda v: all(item in allowed for item in v), fail, allowed)


def above(bound: float) -> Rule:
    """Strictly greater than ``bound``."""
    return Rule(lambda v: v > bound, lambda k, v: f"{k} must be > {bound}, got {v}")


def at_least(bound: float) -> Rule:
    """``bound`` or more."""
    return Rule(lambda v: v >= bound, lambda k, v: f"{k} must be >= {bound}, got {v}")


def between(low: int, high: int) -> Rule:
    """An integer in ``low..high`` (both included)."""
    return Rule(lambda v: low <= v <= high, lambda k, v: f"{k} must be in {low}..{high}, got {v}")


def interval(low: float, high: float, *, open_low: bool = False, open_high: bool = False) -> Rule:
    """A number in the interval, written ``[0, 1)`` etc. in the message."""

    def ok(v: float) -> bool:
        return (low < v if open_low else low <= v) and (v < high if open_high else v <= high)

    text = f"{'(' if open_low else '['}{low}, {high}{')' if open_high else ']'}"
    return Rule(ok, lambda k, v: f"{k} must be in {text}, got {v}")


def not_blank() -> Rule:
    """A string with something besides white space."""
    return Rule(lambda v: bool(v.strip()), lambda k, v: f"{k} must not be empty")


def increasing_positive() -> Rule:
    """A non-decreasing list of positive iterations (LR steps)."""
    return Rule(
        lambda v: list(v) == sorted(v) and all(x > 0 for x in v),
        lambda k, v: f"{k} must be increasing positive iterations, got {_listed(v)}",
    )


def positive_values(count: int | None = None, what: str = "") -> Rule:
    """A non-empty list of positive numbers; with ``count``, exactly that many (``what`` says why)."""
    if count is None:
        return Rule(
            lambda v: bool(v) and all(x > 0 for x in v),
            lambda k, v: f"{k} must be positive, got {_listed(v)}",
        )
    return Rule(
        lambda v: len(v) == count and all(x > 0 for x in v),
        lambda k, v: f"{k} needs {count} positive {what}, got {_listed(v)}",
    )


def signal_names() -> Rule:
    """Names of signals this platform has (``SIGUSR1``...)."""

    def known(name: str) -> bool:
        return isinstance(getattr(signal, name, None), signal.Signals)

    def fail(k: str, v: Any) -> str:
        bad = next(name for name in v if not known(name))
        return f"{k}: unknown signal {bad!r}"

    return Rule(lambda v: all(known(name) for name in v), fail)
