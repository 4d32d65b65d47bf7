"""Message personalisation: Jinja templates, sandboxed, compiled once at journey load.

Context names: `trigger` (the entry event's properties), `event` (the current event's, or the
trigger's when a timer moved the user on), `profile`, `vars` (saved API responses), `user`
(`user.id`), `journey` (`journey.id`, `journey.name`). A missing value renders as empty text;
`{{ trigger.product | default("your item") }}` gives a fallback.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from typing import Any

from jinja2 import TemplateSyntaxError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from nudgeflow.engine.errors import NudgeflowError
from nudgeflow.engine.timeparse import parse_iso


class _Env(ImmutableSandboxedEnvironment):
    """Data keys win over methods: `vars.recs.items` is the "items" key, not dict.items()."""

    def getattr(self, obj: Any, attribute: str) -> Any:
        if isinstance(obj, Mapping) and attribute in obj:
            return obj[attribute]
        return super().getattr(obj, attribute)


_TEXT = _Env(autoescape=False)
_HTML = _Env(autoescape=True)  # event data must not inject markup


def add_duration(value: Any, duration: str) -> str:
    """`{{ add_duration(profile.emi_due_date, "30d") }}`: a date (ISO text or epoch ms) moved by a
    duration; the result keeps the input's form (a date stays a date). Empty when unparseable."""
    from nudgeflow.engine.durations import parse_duration

    ms = parse_duration(duration, allow_negative=True)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(int(value) + ms)
    if not isinstance(value, str):
        return ""
    d = parse_iso(value)
    if d is None:
        return ""
    moved = d + dt.timedelta(milliseconds=ms)
    if len(value) == 10:  # YYYY-MM-DD
        return moved.date().isoformat()
    return moved.isoformat().replace("+00:00", "Z")


for _env in (_TEXT, _HTML):
    _env.globals["add_duration"] = add_duration


class TemplateError(NudgeflowError, ValueError):
    def __init__(self, problem: str, line: int | None) -> None:
        self.line = line
        super().__init__(problem)


class Text:
    """A compiled template string; plain strings skip Jinja entirely."""

    __slots__ = ("_tpl", "source")

    def __init__(self, source: str, html: bool = False) -> None:
        self.source = source
        self._tpl = None
        if "{{" in source or "{%" in source:
            try:
                self._tpl = (_HTML if html else _TEXT).from_string(source)
            except TemplateSyntaxError as e:
                raise TemplateError(f"template error: {e.message}", e.lineno) from None

    def render(self, ctx: Mapping[str, Any]) -> str:
        if self._tpl is None:
            return self.source
        try:
            return self._tpl.render(ctx)
        except Exception as e:  # a bad value must not stop a journey; the text says what broke
            return f"[template error: {type(e).__name__}]"


def compile_value(value: Any, html: bool = False) -> Any:
    """Templates inside nested data (e.g. a webhook body): strings become Text."""
    if isinstance(value, str):
        return Text(value, html)
    if isinstance(value, Mapping):
        return {k: compile_value(v, html) for k, v in value.items()}
    if isinstance(value, list):
        return [compile_value(v, html) for v in value]
    return value


def render_value(value: Any, ctx: Mapping[str, Any]) -> Any:
    if isinstance(value, Text):
        return value.render(ctx)
    if isinstance(value, Mapping):
        return {k: render_value(v, ctx) for k, v in value.items()}
    if isinstance(value, list):
        return [render_value(v, ctx) for v in value]
    return value
