"""Typed errors of the journey engine, with messages a user can act on."""

from __future__ import annotations


class NudgeflowError(Exception):
    """Base class of every error nudgeflow raises on purpose."""


class ConfigError(NudgeflowError):
    """A setting cannot be used as given (a busy port, a directory that cannot be made): exit 2."""


class JourneyFileError(NudgeflowError):
    """A journey file is invalid: `file:line: path: problem` (the path inside the file, if any)."""

    def __init__(self, file: str, line: int | None, path: str, problem: str) -> None:
        self.file, self.line, self.path, self.problem = file, line, path, problem
        where = f"{file}:{line}" if line else file
        super().__init__(f"{where}: {path}: {problem}" if path else f"{where}: {problem}")


class JourneyFileErrors(NudgeflowError):
    """Several problems found in journey files; each one is a JourneyFileError."""

    def __init__(self, errors: list[JourneyFileError]) -> None:
        self.errors = errors
        super().__init__("\n".join(str(e) for e in errors))


Path = tuple[str | int, ...]  # where in a journey file: ("steps", "wait_1", "wait")


class CompileError(NudgeflowError):
    """One problem at a path inside a journey document (the loader adds file and line)."""

    def __init__(self, path: Path, problem: str, line_offset: int | None = None) -> None:
        self.path, self.problem, self.line_offset = path, problem, line_offset
        super().__init__(problem)


class CompileErrors(NudgeflowError):
    """Every problem found in one document (the loader turns them into JourneyFileErrors)."""

    def __init__(self, errors: list[CompileError]) -> None:
        self.errors = errors
        super().__init__("; ".join(e.problem for e in errors))


class DurationError(NudgeflowError, ValueError):
    """A duration string could not be parsed."""
