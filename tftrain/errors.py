"""The errors a user can act on: each becomes one ``tftrain: error:`` line
and the exit code it names."""

from __future__ import annotations

# A run that may succeed when started again: another task of the cluster was
# lost (died, stalled, never came). Above every 128+signal code, and 128 or
# more, which Kubernetes' TFJob ``ExitCode`` restart policy retries (it
# treats 1-127 as permanent: bad input, 2, and a failed run, 1).
EXIT_RETRY = 200


def first_line(error: BaseException) -> str:
    """The first line of ``error``'s message, or its type's name when it has none."""
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


class ConfigError(ValueError):
    """A user-facing configuration mistake: one clear message, no traceback."""


class RunError(RuntimeError):
    """A run that cannot go on, for a reason the user can act on."""

    exit_code = 2


class DivergedError(RunError):
    """The training loss or the evaluation became NaN or infinite."""

    exit_code = 1


class DataError(ValueError):
    """Data that cannot be found or read: one clear message for the user."""


class LostTaskError(RunError):
    """Another task of the cluster went away: starting again may succeed."""

    exit_code = EXIT_RETRY


class UserCodeError(RunError):
    """The user's own code (an experiment, a task, a model) raised: their
    traceback is shown, then this one line."""

    def __init__(self, what: str, error: BaseException):
        self.what, self.error = what, error
        lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
        first = lines[0] if lines else ""
        if first == "in user code:" and len(lines) > 1:  # a traced function's: the cause is last
            first = lines[-1]
        super().__init__(
            f"{what} raised {type(error).__name__}"
            + (f": {first[:300]}" if first else "")
            + " (the traceback above is from your code)."
        )
