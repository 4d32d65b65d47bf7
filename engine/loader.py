"""Read journey files and segment files from disk into one validated, compiled JourneySet.

Every problem in every file is collected and reported together as JourneyFileErrors, each with
file, line, path and what is wrong, so a marketer fixes a whole file in one round.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

from nudgeflow.engine.compiler import compile_caps, compile_journey, compile_segments
from nudgeflow.engine.errors import CompileError, CompileErrors, JourneyFileError, JourneyFileErrors
from nudgeflow.engine.graph import Cap, Journey, JourneySet
from nudgeflow.engine.predicates import CounterRegistry
from nudgeflow.engine.yamlsource import format_path, line_of, load_with_lines

SUFFIXES = (".yaml", ".yml")


def journey_paths(paths: Iterable[str | Path]) -> list[Path]:
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            out.extend(sorted(f for f in p.rglob("*") if f.suffix in SUFFIXES and f.is_file()))
        elif p.is_file():
            out.append(p)
        else:
            raise JourneyFileErrors([JourneyFileError(str(p), None, "", "no such file or directory")])
    return out


def load_journeys(paths: Iterable[str | Path]) -> JourneySet:
    """Load every journey (*.yaml with a `journey:` key) and segments file (a `segments:` key)."""
    docs: list[tuple[str, Any, dict[tuple[str | int, ...], int]]] = []
    errors: list[JourneyFileError] = []
    for f in journey_paths(paths):
        try:
            data, lines = load_with_lines(f.read_text(encoding="utf-8"), str(f))
        except JourneyFileError as e:
            errors.append(e)
            continue
        docs.append((str(f), data, lines))
    return compile_documents(docs, errors)


def load_texts(texts: dict[str, str]) -> JourneySet:
    """The same from in-memory texts ({name: yaml}); used by tests and tools."""
    docs, errors = [], []
    for name, text in texts.items():
        try:
            data, lines = load_with_lines(text, name)
        except JourneyFileError as e:
            errors.append(e)
            continue
        docs.append((name, data, lines))
    return compile_documents(docs, errors)


def compile_documents(
    docs: list[tuple[str, Any, dict[tuple[str | int, ...], int]]], errors: list[JourneyFileError]
) -> JourneySet:
    reg = CounterRegistry()
    segments: dict[str, Any] = {}
    caps: list[Cap] = []

    def report(file: str, lines: dict[tuple[str | int, ...], int], ces: list[CompileError]) -> None:
        for ce in ces:
            line = line_of(lines, ce.path)
            if line is not None and ce.line_offset:
                line += ce.line_offset
            errors.append(JourneyFileError(file, line, format_path(ce.path), ce.problem))

    journey_docs = []
    for file, data, lines in docs:
        if isinstance(data, dict) and ("segments" in data or "frequency_caps" in data) and "journey" not in data:
            try:
                segs, ces = compile_segments(data, reg)
                caps.extend(compile_caps(data))
            except CompileErrors as m:
                report(file, lines, m.errors)
                continue
            for name in segs:
                if name in segments:
                    ces.append(CompileError(("segments", name), f"segment '{name}' is defined twice"))
            segments.update(segs)
            report(file, lines, ces)
        else:
            journey_docs.append((file, data, lines))
    seen: dict[str, str] = {}
    journeys: dict[str, Journey] = {}
    for file, data, lines in journey_docs:
        try:
            j = compile_journey(data, file, reg, set(segments))
        except CompileErrors as m:
            report(file, lines, m.errors)
            continue
        if j.id in seen:
            report(file, lines, [CompileError(("journey",), f"journey id '{j.id}' is also used by {seen[j.id]}")])
            continue
        seen[j.id] = file
        journeys[j.id] = j
    if errors:
        raise JourneyFileErrors(errors)
    return JourneySet(journeys, segments, reg.counters(), tuple(caps), tuple(sorted(reg.segment_windows)))
