"""Load YAML while remembering the line of every key and value, and rejecting duplicate keys.

PyYAML silently keeps the last of two equal keys, which would hide a marketer's mistake in a
journey file; here it is an error with its line. Lines are 1-based.
"""

from __future__ import annotations

from typing import Any

import yaml

from nudgeflow.engine.errors import JourneyFileError

Path = tuple[str | int, ...]


class _Constructor(yaml.constructor.SafeConstructor):
    pass


def load_with_lines(text: str, file: str) -> tuple[Any, dict[Path, int]]:
    """Parse one YAML document; return (data, {path: line})."""
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as e:
        line = e.problem_mark.line + 1 if e.problem_mark else None
        problem = f"not valid YAML: {e.problem}"
        if e.context and e.context_mark and e.context_mark.line + 1 != line:
            # the parser notices some mistakes only lines later: say where the construct began
            problem += f" ({e.context} that starts on line {e.context_mark.line + 1})"
        raise JourneyFileError(file, line, "", problem) from None
    lines: dict[Path, int] = {}
    if node is None:
        return None, lines
    constructor = _Constructor()
    return _build(node, (), lines, constructor, file), lines


def _build(node: yaml.Node, path: Path, lines: dict[Path, int], c: _Constructor, file: str) -> Any:
    lines[path] = node.start_mark.line + 1
    if isinstance(node, yaml.MappingNode):
        out: dict[Any, Any] = {}
        for knode, vnode in node.value:
            key = c.construct_object(knode, deep=True)
            if not isinstance(key, (str, int)):
                raise JourneyFileError(file, knode.start_mark.line + 1, _fmt(path), f"key {key!r} must be text")
            if key in out:
                raise JourneyFileError(file, knode.start_mark.line + 1, _fmt((*path, key)), f"duplicate key '{key}'")
            out[key] = _build(vnode, (*path, key), lines, c, file)
            lines[(*path, key)] = knode.start_mark.line + 1
        return out
    if isinstance(node, yaml.SequenceNode):
        return [_build(v, (*path, i), lines, c, file) for i, v in enumerate(node.value)]
    return c.construct_object(node, deep=True)


def line_of(lines: dict[Path, int], path: Path) -> int | None:
    """The line of `path`, or of its nearest ancestor that has one."""
    for end in range(len(path), -1, -1):
        if path[:end] in lines:
            return lines[path[:end]]
    return None


def _fmt(path: Path) -> str:
    return ".".join(str(p) for p in path)


def format_path(path: Path) -> str:
    """steps.push_offer.send, items[2] style path text for error messages."""
    out = ""
    for p in path:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out
