"""The errors a user can act on: each becomes one ``tftrain: error:`` line."""

from __future__ import annotations


class ConfigError(ValueError):
    """A user-facing configuration mistake: one clear message, no traceback."""


class RunError(RuntimeError):
    """A run that cannot go on, for a reason the user can act on."""
