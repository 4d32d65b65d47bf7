"""Typed errors of the journey engine, with messages a user can act on."""

from __future__ import annotations


class NudgeflowError(Exception):
    """Base class of every error nudgeflow raises on purpose."""


class JourneyFileError(NudgeflowError):
    """A journey file is invalid. Carries the file, the line and the path inside the file."""

    def __init__(self, file: str, line: int | None, path: str, problem: str) -> None:
        self.file, self.line, self.path, self.problem = file, line, path, problem
        where = f"{file}:{line}" if line else file
        at = f" at {path}" if path else ""
        super().__init__(f"{where}:{at}: {problem}")


class JourneyFileErrors(NudgeflowError):
    """Several problems found in journey files; each one is a JourneyFileError."""

    def __init__(self, errors: list[JourneyFileError]) -> None:
        self.errors = errors
        super().__init__("\n".join(str(e) for e in errors))


class DurationError(ValueError):
    """A duration string could not be parsed."""
