"""Message personalisation: Jinja templates, sandboxed, compiled once at journey load.

Context names: `trigger` (the entry event's properties), `event` (the current event's, or the
trigger's when a timer moved the user on), `profile`, `vars` (saved API responses), `user`
(`user.id`), `journey` (`journey.id`, `journey.name`). Printing a value the user's data lacks is an
error (the message is not sent, and counted); `{{ trigger.product | default("your item") }}` gives
a fallback, and `{% if profile.vip %}` is simply false.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from typing import Any

from jinja2 import TemplateSyntaxError, Undefined, meta, nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment
from markupsafe import escape

from nudgeflow.engine.errors import NudgeflowError
from nudgeflow.engine.timeparse import parse_iso


class _Env(ImmutableSandboxedEnvironment):
    """Data keys win over methods: `vars.recs.items` is the "items" key, not dict.items()."""

    def getattr(self, obj: Any, attribute: str) -> Any:
        if isinstance(obj, Mapping) and attribute in obj:
            return obj[attribute]
        return super().getattr(obj, attribute)


ROOTS = frozenset({"trigger", "event", "profile", "vars", "user", "journey", "now"})


class _Missing(Undefined):
    """A value the user's data lacks. Printing it is an error, so the message is not sent ("Hi ,
    your order" never reaches a customer); testing it is not: `{% if profile.vip %}` is false and
    `{{ profile.first_name | default("there") }}` gives the fallback."""

    __slots__ = ()

    def __str__(self) -> str:
        self._fail_with_undefined_error()


_TEXT = _Env(autoescape=False, undefined=_Missing)
_HTML = _Env(autoescape=True, undefined=_Missing)  # event data must not inject markup


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


MAX_RENDERED = 64 * 1024  # characters one template may render to: event data must not inflate a message


class RenderError(NudgeflowError, ValueError):
    """A template failed for this user's data, or rendered more than MAX_RENDERED characters: the
    caller does not send what it was rendering (a broken text never reaches a customer)."""


Path = tuple[str, ...]


class Text:
    """A compiled template string; plain strings skip Jinja entirely, and so do templates made only
    of text and `{{ a.b.c }}` lookups (optionally `| default(...)`) whenever every value they look
    up is present and plain (text, number, bool, null): the result is what Jinja would render."""

    __slots__ = ("_fast", "_html", "_tpl", "source")

    def __init__(self, source: str, html: bool = False) -> None:
        self.source, self._html = source, html
        self._tpl = None
        self._fast: list[str | Path] | None = None
        if "{{" in source or "{%" in source:
            env = _HTML if html else _TEXT
            try:
                self._tpl = env.from_string(source)
                ast = env.parse(source)
                self._fast = _lookups_only(ast)
            except TemplateSyntaxError as e:
                raise TemplateError(f"template error: {e.message}", e.lineno) from None
            unknown = sorted(meta.find_undeclared_variables(ast) - ROOTS - set(env.globals))
            if unknown:  # a typo (`{{ profil.name }}`) would render as empty text for every user
                raise TemplateError(
                    f"template error: unknown name {', '.join(map(repr, unknown))}: templates see "
                    + ", ".join(sorted(ROOTS)),
                    None,
                )

    def render(self, ctx: Mapping[str, Any]) -> str:
        if self._tpl is None:
            return self.source
        if self._fast is not None and (text := self._render_fast(self._fast, ctx)) is not None:
            if len(text) > MAX_RENDERED:
                raise RenderError("too_long")
            return text
        try:
            text = self._tpl.render(ctx)
        except Exception as e:  # a bad value must not stop a journey: the caller skips what it rendered
            raise RenderError(type(e).__name__) from None
        if len(text) > MAX_RENDERED:
            raise RenderError("too_long")
        return text

    def _render_fast(self, parts: list[str | Path], ctx: Mapping[str, Any]) -> str | None:
        out = []
        for part in parts:
            if isinstance(part, str):
                out.append(part)
                continue
            v: Any = ctx
            for key in part:
                if (v.__class__ is not dict and not isinstance(v, Mapping)) or key not in v:
                    return None  # missing: Jinja decides (default filter, dict attributes, ...)
                v = v[key]
            if v is not None and not isinstance(v, (str, int, float)):
                return None
            out.append(str(escape(v)) if self._html else str(v))
        return "".join(out)


def _lookups_only(tpl: nodes.Template) -> list[str | Path] | None:
    """The template as text and lookup paths, or None when it uses anything else."""
    if len(tpl.body) != 1 or not isinstance(tpl.body[0], nodes.Output):
        return None
    parts: list[str | Path] = []
    for node in tpl.body[0].nodes:
        if isinstance(node, nodes.TemplateData):
            parts.append(node.data)
            continue
        if isinstance(node, nodes.Filter):  # `default` only changes what a missing value renders as
            if node.name != "default" or node.kwargs or node.dyn_args or node.dyn_kwargs or node.node is None:
                return None
            node = node.node
        path: list[str] = []
        while isinstance(node, nodes.Getattr):
            path.append(node.attr)
            node = node.node
        if not isinstance(node, nodes.Name):
            return None
        parts.append((node.name, *reversed(path)))
    return parts


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
