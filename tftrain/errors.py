"""The errors a user can act on: each becomes one ``tftrain: error:`` line
and the exit code it names."""

from __future__ import annotations


class ConfigError(ValueError):
    """A user-facing configuration mistake: one clear message, no traceback."""


class RunError(RuntimeError):
    """A run that cannot go on, for a reason the user can act on."""

    exit_code = 2


class DivergedError(RunError):
    """The training loss or the evaluation became NaN or infinite."""

    exit_code = 1
