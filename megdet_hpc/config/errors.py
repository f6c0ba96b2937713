"""``ConfigError``: its own module, so the schema's rules, the loader and the batch arithmetic share it."""

from __future__ import annotations

from megdet_hpc.utils.errors import UserError


class ConfigError(UserError, ValueError):
    """An invalid configuration, with a one-line message naming the key."""
