"""Errors that carry the exit-code contract shared by the package and the launchers.

0 finished; 64 bad config or usage and 65 bad data (never requeue); 75 stopped early on
purpose, resume me (requeue); anything else is a failure (requeue up to a limit).
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_USAGE = 64  # EX_USAGE: bad config or command line
EXIT_DATA = 65  # EX_DATAERR: bad input data
EXIT_STOPPED = 75  # EX_TEMPFAIL: stopped on purpose, resume me


class LlmtrainError(Exception):
    """An error a user can fix; printed as one paragraph, without a traceback."""

    exit_code = 1

    def __init__(self, problem: str, fix: str = "") -> None:
        self.problem = problem
        self.fix = fix
        super().__init__(self.message())

    def message(self) -> str:
        return f"{self.problem}\n  fix: {self.fix}" if self.fix else self.problem


class ConfigError(LlmtrainError):
    """Bad configuration or usage (exit 64). May hold several problems reported at once."""

    exit_code = EXIT_USAGE

    def __init__(self, problem: str, fix: str = "", *, problems: list[str] | None = None) -> None:
        self.problems = problems or []
        super().__init__(problem, fix)

    def message(self) -> str:
        lines = [self.problem, *(f"  - {p}" for p in self.problems)]
        if self.fix:
            lines.append(f"  fix: {self.fix}")
        return "\n".join(lines)


class DataError(LlmtrainError):
    """Bad input data (exit 65)."""

    exit_code = EXIT_DATA


class NeedsGpuError(ConfigError):
    """A verb or method that needs CUDA was asked for on a machine without it (exit 64)."""


class StopRequested(Exception):
    """Training stopped on purpose after saving a checkpoint (exit 75)."""

    exit_code = EXIT_STOPPED
