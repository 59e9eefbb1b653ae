"""neo's error family: one base class that carries the message for the user and the exit code.

Every launcher catches ``NeoError`` and prints it as one line on stderr (no traceback), then exits with
``exit_code`` (2: the input was wrong, and the message says how to fix it). Anything else that escapes
is a bug in neo and keeps its traceback. This module imports nothing, so every layer can use it.
"""

from __future__ import annotations

USER_ERROR_EXIT = 2  # bad config, data, checkpoint, command line or launch environment
# EX_TEMPFAIL: "saved a checkpoint after SIGTERM/SIGUSR1, stopped early; run me again".
# slurm/*.sbatch requeue the job on it (they spell the number, being shell scripts).
REQUEUE_EXIT = 75


class NeoError(Exception):
    """A problem the user can fix; ``str(error)`` says what is wrong and how to fix it."""

    exit_code: int = USER_ERROR_EXIT

    def __init__(self, message: str, *, exit_code: int | None = None):
        super().__init__(message)
        self.message = message
        if exit_code is not None:
            self.exit_code = exit_code

    def __str__(self) -> str:
        return self.message

    def one_line(self) -> str:
        """The message as a single line (a multi-problem config error joins its problems with '; ')."""
        return " ".join(part.strip() for part in str(self).splitlines() if part.strip())


class ConfigError(NeoError):
    """Everything wrong with a config, one problem per line."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        n = len(self.problems)
        head = f"config has {n} problem{'s' * (n != 1)}:"
        super().__init__(head + "\n" + "\n".join(f"  - {p}" for p in self.problems))

    def one_line(self) -> str:
        if len(self.problems) == 1:
            return f"config: {self.problems[0]}"
        n = len(self.problems)
        return f"config has {n} problems: " + " | ".join(self.problems)


class DataError(NeoError):
    """A token file, corpus or dataset that cannot be used as given."""


class TokenizerError(DataError):
    """A tokenizer that cannot be loaded; the message says what to install or fix."""


class CheckpointError(NeoError):
    """A checkpoint that cannot be used; the message names the path and what to do."""


class LaunchError(NeoError):
    """The environment does not describe a runnable job; the message says why and what to do."""


class ExportError(NeoError):
    """A model that cannot be written in (or read from) another library's format exactly."""


class UsageError(NeoError):
    """Bad command-line input."""


class GenerationError(NeoError):
    """A generation request that cannot be served; the message says which setting to change."""


class EvalError(NeoError):
    """An evaluation that cannot run as asked."""
