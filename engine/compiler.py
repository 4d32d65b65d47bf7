"""Validated journey files -> the immutable graph, with every problem tied to a path.

Checks beyond the schema: step references exist, every step is reachable from the first one,
every cycle passes through a wait (a loop without one would spin forever), filters, conditions,
templates and time zones are well-formed, and segments referenced are defined.
"""

from __future__ import annotations

import hashlib
import json
import zoneinfo
from collections.abc import Mapping
from typing import Any, assert_never

from pydantic import BaseModel, ValidationError

from nudgeflow.engine import graph as g
from nudgeflow.engine import schema as s
from nudgeflow.engine.durations import parse_duration
from nudgeflow.engine.errors import CompileError, CompileErrors, Path
from nudgeflow.engine.predicates import CounterRegistry, SpecError, compile_condition, compile_where, split_refs
from nudgeflow.engine.templates import TemplateError, Text, compile_value
from nudgeflow.engine.timeparse import datetime_to_ms

DAYS = {"mon": 0, "tue": 1, "wed": 2, "thu": 3, "fri": 4, "sat": 5, "sun": 6}


def pydantic_problems(e: ValidationError, prefix: Path = ()) -> list[CompileError]:
    out = []
    for err in e.errors():
        loc = prefix + tuple(p for p in err["loc"] if not (isinstance(p, str) and "[" in p))
        kind, msg = err["type"], err["msg"]
        if kind == "extra_forbidden":
            msg = f"unknown field '{loc[-1]}'"
        elif kind == "missing":
            msg = f"missing required field '{loc[-1]}'"
        elif kind == "literal_error":
            msg = f"{msg}, got {err.get('input')!r}"
        elif kind == "value_error":
            msg = msg.removeprefix("Value error, ")
        elif kind == "string_pattern_mismatch":
            msg = f"'{err.get('input')}' is not a valid id (lowercase letters, digits, '-' and '_')"
        out.append(CompileError(loc, msg))
    return out


def _validate(model: type[BaseModel], raw: Any, path: Path) -> Any:
    try:
        return model.model_validate(raw)
    except ValidationError as e:
        raise CompileErrors(pydantic_problems(e, path)) from None


def compile_caps(raw: Mapping[str, Any]) -> tuple[g.Cap, ...]:
    """The frequency caps of a shared-definitions file."""
    model = _validate(s.SegmentsFile, raw, ())
    return tuple(g.Cap(c.max, parse_duration(c.per), c.channel) for c in model.frequency_caps)


def compile_segments(raw: Mapping[str, Any], reg: CounterRegistry) -> tuple[dict[str, Any], list[CompileError]]:
    """segments.yaml: {segments: {name: condition}}; segments may use other segments."""
    errors: list[CompileError] = []
    model = _validate(s.SegmentsFile, raw, ())
    names = set(model.segments)
    out = {}
    start = len(reg.windows)
    for name, spec in model.segments.items():
        try:
            out[name] = compile_condition(spec, reg, names)
        except SpecError as e:
            errors.append(CompileError(("segments", name, *e.path), e.problem))
    reg.segment_windows.update(reg.windows[start:])
    return out, errors


def compile_journey(raw: Any, file: str, reg: CounterRegistry, segments: set[str]) -> g.Journey:
    """Raise CompileErrors with every problem found, or return the compiled journey."""
    if not isinstance(raw, Mapping):
        raise CompileErrors([CompileError((), "a journey file must be a mapping with journey, name, entry, steps")])
    try:
        jf: s.JourneyFile = _validate(s.JourneyFile, raw, ())
    except CompileErrors as top:
        # the file's own fields are wrong: still report every problem of every step
        raw_steps = raw.get("steps")
        if isinstance(raw_steps, Mapping) and all(isinstance(v, Mapping) for v in raw_steps.values()):
            _compile_steps(dict(raw_steps), top.errors, lambda spec, path: None, lambda spec, path: None, reg)
        raise
    errors: list[CompileError] = []
    ids = list(jf.steps)

    def where(spec: Any, path: Path) -> Any:
        try:
            return compile_where(spec)
        except SpecError as e:
            errors.append(CompileError(path + e.path, e.problem))
            return lambda _p: False

    def cond(spec: Any, path: Path) -> Any:
        try:
            return compile_condition(spec, reg, segments)
        except SpecError as e:
            errors.append(CompileError(path + e.path, e.problem))
            return lambda _c: False

    def rule(event: str, spec: dict[str, Any], path: Path) -> g.Rule:
        plain, refs = split_refs(spec)
        keys = tuple(r.prop for r in refs)
        return g.Rule(event, where(plain, path), reg.need(event, plain, None, 1, keys), refs)

    # entry
    e = jf.entry
    triggers = [x for x in (e.event, e.segment_entered, e.segment_left, e.attribute_changed) if x] + (
        ["enrolled"] if e.enrolled else []
    )
    if len(triggers) != 1:
        errors.append(
            CompileError(
                ("entry",),
                "entry needs exactly one of event, segment_entered, segment_left, attribute_changed, enrolled",
            )
        )
    for key, seg in (("segment_entered", e.segment_entered), ("segment_left", e.segment_left)):
        if seg and seg not in segments:
            errors.append(CompileError(("entry", key), f"unknown segment '{seg}'; define it in segments.yaml"))
    for i, seg in enumerate(e.audience):
        if seg not in segments:
            errors.append(CompileError(("entry", "audience", i), f"unknown segment '{seg}'"))
    if e.instance_per and not e.event:
        errors.append(CompileError(("entry", "instance_per"), "instance_per needs entry: event (a property of it)"))
    if e.include_current_members and not e.segment_entered:
        errors.append(
            CompileError(("entry", "include_current_members"), "include_current_members needs entry: segment_entered")
        )
    if e.eligibility == "once" and (e.lock or e.cap):
        errors.append(CompileError(("entry", "eligibility"), "lock and cap only apply to eligibility: multiple"))
    entry = g.Entry(
        events=tuple([e.event] if isinstance(e.event, str) else (e.event or [])),
        where=where(e.where, ("entry", "where")),
        segment_entered=e.segment_entered,
        segment_left=e.segment_left,
        attribute_changed=e.attribute_changed,
        enrolled=e.enrolled,
        audience=tuple(e.audience),
        once=e.eligibility == "once",
        lock=parse_duration(e.lock) if e.lock else None,
        cap_max=e.cap.max if e.cap else None,
        cap_per=parse_duration(e.cap.per) if e.cap and e.cap.per else None,
        restart=e.while_active == "restart",
        starts_at=datetime_to_ms(e.starts_at) if e.starts_at else None,
        ends_at=datetime_to_ms(e.ends_at) if e.ends_at else None,
        include_current_members=e.include_current_members,
        instance_per=e.instance_per,
    )
    goal = None
    if jf.goal:
        goal = g.Goal(
            rule(jf.goal.event, jf.goal.where, ("goal", "where")),
            parse_duration(jf.goal.within) if jf.goal.within else None,
            jf.goal.exit,
        )
    exits = tuple(rule(x.event, x.where, ("exit_when", i, "where")) for i, x in enumerate(jf.exit_when))

    nodes = _compile_steps(jf.steps, errors, where, cond, reg)
    errors.extend(_check_graph(nodes, ids, complete=not errors))
    if errors:
        raise CompileErrors(errors)
    return g.Journey(
        jf.journey,
        jf.name,
        jf.version,
        jf.status,
        entry,
        goal,
        exits,
        nodes,
        ids[0],
        file,
        content_digest(raw),
        jf.category,
        jf.when_capped,
    )


# Fields that do not change what a journey does to a user: editing them needs no version bump.
_NOT_CONTENT = ("status", "description", "source")


def content_digest(raw: Mapping[str, Any]) -> str:
    """A short hash of what a journey file says (key order and comments do not matter): two
    files with one version and different digests are an edit that forgot its version bump."""
    doc = {k: v for k, v in raw.items() if k not in _NOT_CONTENT}
    text = json.dumps(doc, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def fixed_origin_problem(url: str) -> str | None:
    """Why a call URL's scheme and host are not fixed text, or None. Templates may fill the path,
    query, headers and body only: a host from event or profile data would let end users point the
    call runner anywhere (README "Security model")."""
    scheme, sep, rest = url.partition("://")
    if not sep or scheme.lower() not in ("http", "https") or "{" in scheme:
        return "a call URL starts with http:// or https:// (fixed text, not a template)"
    authority = rest
    for stop in "/?#":
        authority = authority.split(stop, 1)[0]
    if not authority or "{{" in authority or "{%" in authority or "{#" in authority:
        return "a call URL's host is fixed text: templates only after the first / (path, query)"
    if len(authority) == len(rest) and ("{{" in rest or "{%" in rest):
        return "a call URL's host is fixed text: templates only after the first / (path, query)"
    return None


def _text(v: str, path: Path, html: bool = False) -> Text:
    try:
        return Text(v, html)
    except TemplateError as e:
        raise CompileError(path, str(e), (e.line or 1) - 1) from None


def _message(m: s.Content, channel: str, fallback: s.Fallback | None, path: Path) -> g.Message:
    fields = ("subject", "title", "body", "text", "html", "url", "image")
    content = {f: _text(v, (*path, f), f == "html") for f in fields if (v := getattr(m, f)) is not None}
    if not content and not m.template:
        raise CompileError(path, "a send needs a template id or content (title, body, text, subject, ...)")
    try:
        data = compile_value(m.data)
    except TemplateError as e:
        raise CompileError((*path, "data"), str(e)) from None
    fb = None
    if fallback is not None:
        if fallback.send == channel:
            raise CompileError((*path, "fallback"), f"the fallback channel must differ from '{channel}'")
        fb = _message(fallback, fallback.send, fallback.fallback, (*path, "fallback"))
    to = _text(m.to, (*path, "to")) if m.to is not None else None
    expires = parse_duration(m.expires_after) if m.expires_after else DEFAULT_EXPIRY_MS[channel]
    return g.Message(channel, m.template, content, data, fb, to, expires)


H_MS = 3_600_000
DEFAULT_EXPIRY_MS = {  # how long a send request stays worth delivering, by channel
    "push": 12 * H_MS,
    "webpush": 12 * H_MS,
    "sms": 24 * H_MS,
    "whatsapp": 24 * H_MS,
    "email": 72 * H_MS,
    "inapp": 168 * H_MS,
    "webhook": 24 * H_MS,
}


class _Steps:
    """Step models -> graph nodes, one method per step kind (`compile_<kind>`)."""

    def __init__(self, sid: str, follow: str, path: Path, where: Any, cond: Any, reg: CounterRegistry) -> None:
        self.sid, self.follow, self.path, self.where, self.cond, self.reg = sid, follow, path, where, cond, reg

    def node(self, step: s.StepModel) -> g.Node:
        match step:
            case s.SendStep():
                return self.compile_send(step)
            case s.WaitStep():
                return g.Wait(self.sid, parse_duration(step.wait), self.next(step.next))
            case s.WaitUntilStep():
                return self.compile_wait_until(step)
            case s.WaitWindowStep():
                return self.compile_wait_window(step)
            case s.WaitForStep():
                return self.compile_wait_for(step)
            case s.IfStep():
                cond = self.cond(step.if_, (*self.path, "if"))
                return g.Branch(self.sid, ((cond, step.then or self.follow),), step.else_ or self.follow)
            case s.BranchStep():
                return self.compile_branch(step)
            case s.SplitStep():
                return self.compile_split(step)
            case s.UpdateStep():
                return self.compile_update(step)
            case s.CallStep():
                return self.compile_call(step)
            case s.EndStep():
                return g.End(self.sid)
            case _:
                assert_never(step)

    def next(self, explicit: str | None) -> str:
        return explicit or self.follow

    def compile_send(self, st: s.SendStep) -> g.Send:
        return g.Send(self.sid, _message(st, st.send, st.fallback, self.path), self.next(st.next))

    def compile_wait_until(self, st: s.WaitUntilStep) -> g.WaitUntil:
        w = st.wait_until
        if isinstance(w, s.UntilAttribute):
            off = parse_duration(w.offset, allow_negative=True) if w.offset else 0
            return g.WaitUntil(self.sid, None, w.attribute, off, st.if_missing, self.next(st.next))
        return g.WaitUntil(self.sid, datetime_to_ms(w), None, 0, st.if_missing, self.next(st.next))

    def compile_wait_window(self, st: s.WaitWindowStep) -> g.WaitWindow:
        w, path = st.wait_window, self.path
        tz = w.timezone
        if not tz.startswith("attribute:"):
            try:
                zoneinfo.ZoneInfo(tz)
            except (zoneinfo.ZoneInfoNotFoundError, ValueError):
                raise CompileError((*path, "wait_window", "timezone"), f"unknown time zone '{tz}'") from None
        start, end = _minutes(w.start), _minutes(w.end)
        if start is None or end is None or start >= end:
            raise CompileError((*path, "wait_window"), "'from' and 'to' must be HH:MM with from < to")
        return g.WaitWindow(self.sid, frozenset(DAYS[d] for d in w.days), start, end, tz, self.next(st.next))

    def compile_wait_for(self, st: s.WaitForStep) -> g.WaitFor:
        spec, refs = split_refs(st.where)
        return g.WaitFor(
            self.sid,
            st.wait_for,
            self.where(spec, (*self.path, "where")),
            self.reg.need(st.wait_for, spec, None, 1, tuple(r.prop for r in refs)),
            parse_duration(st.timeout),
            st.on_timeout,
            self.next(st.next),
            refs,
        )

    def compile_branch(self, st: s.BranchStep) -> g.Branch:
        cases = tuple((self.cond(c.when, (*self.path, "branch", i, "when")), c.next) for i, c in enumerate(st.branch))
        return g.Branch(self.sid, cases, st.otherwise or self.follow)

    def compile_split(self, st: s.SplitStep) -> g.Split:
        total, arms = 0, []
        for arm in st.split:
            total += arm.percent
            if arm.control and arm.next:
                raise CompileError((*self.path, "split"), "a control arm receives nothing: it has no 'next'")
            arms.append((total, g.END if arm.control else (arm.next or self.follow)))
        if total != 100:
            raise CompileError((*self.path, "split"), f"percentages must add up to 100, not {total}")
        return g.Split(self.sid, tuple(arms))

    def compile_update(self, st: s.UpdateStep) -> g.Update:
        u = st.update
        if not (u.set or u.increment or u.unset):
            raise CompileError((*self.path, "update"), "an update needs set, increment or unset")
        try:
            values = compile_value(dict(u.set))
        except TemplateError as e:
            raise CompileError((*self.path, "update", "set"), str(e)) from None
        return g.Update(self.sid, values, dict(u.increment), tuple(u.unset), self.next(st.next))

    def compile_call(self, st: s.CallStep) -> g.Call:
        if (problem := fixed_origin_problem(st.call)) is not None:
            raise CompileError((*self.path, "call"), problem)
        try:
            body, headers = compile_value(st.body), compile_value(st.headers)
        except TemplateError as e:
            raise CompileError(self.path, str(e)) from None
        return g.Call(
            self.sid,
            _text(st.call, (*self.path, "call")),
            st.method,
            headers,
            body,
            st.save_as,
            parse_duration(st.timeout),
            st.on_error or g.END,
            self.next(st.next),
        )


def _minutes(hhmm: str) -> int | None:
    h, m = int(hhmm[:2]), int(hhmm[3:])
    return h * 60 + m if (h < 24 and m < 60) or (h == 24 and m == 0) else None


def _compile_steps(
    raw_steps: Mapping[str, Any], errors: list[CompileError], where: Any, cond: Any, reg: CounterRegistry
) -> dict[str, g.Node]:
    """Every step that compiles, in file order; every problem of the others into `errors`."""
    ids, nodes = list(raw_steps), dict[str, g.Node]()
    for i, sid in enumerate(ids):
        path: Path = ("steps", sid)
        raw_step = raw_steps[sid]
        follow = ids[i + 1] if i + 1 < len(ids) else g.END
        if sid == g.END:
            errors.append(CompileError(path, "'end' is reserved; name the step otherwise"))
            continue
        kinds = [k for k in s.STEP_KINDS if k in raw_step]
        if len(kinds) != 1:
            what = "none" if not kinds else ", ".join(kinds)
            errors.append(
                CompileError(path, f"a step needs exactly one action ({', '.join(s.STEP_KINDS)}); found {what}")
            )
            continue
        try:
            step = _validate(s.STEP_KINDS[kinds[0]], raw_step, path)
        except CompileErrors as m:
            errors.extend(m.errors)
            continue
        try:
            nodes[sid] = _Steps(sid, follow, path, where, cond, reg).node(step)
        except CompileError as ce:
            errors.append(ce)
    return nodes


def _check_graph(nodes: dict[str, g.Node], ids: list[str], complete: bool = True) -> list[CompileError]:
    """References of the compiled steps name steps of the file; and, when every step compiled
    (`complete`), every step is reachable and every loop passes through a wait."""
    errors = []
    for sid, n in nodes.items():
        for fld, target in g.successors(n):
            if target != g.END and target not in ids:
                errors.append(CompileError(("steps", sid, fld), f"'{target}' is not a step of this journey"))
    if errors or not complete:
        return errors
    seen, todo = {ids[0]}, [ids[0]]
    while todo:
        for _, t in g.successors(nodes[todo.pop()]):
            if t != g.END and t not in seen:
                seen.add(t)
                todo.append(t)
    errors += [CompileError(("steps", sid), f"step '{sid}' can never be reached") for sid in ids if sid not in seen]
    # a cycle is fine only through a blocking step: search cycles among non-blocking steps
    instant = {sid for sid, n in nodes.items() if not isinstance(n, g.BLOCKING)}
    state: dict[str, int] = {}

    def visit(sid: str, trail: list[str]) -> None:
        state[sid] = 1
        for _, t in g.successors(nodes[sid]):
            if t in instant:
                if state.get(t) == 1:
                    loop = [*trail[trail.index(t) :], t] if t in trail else [sid, t]
                    errors.append(CompileError(("steps", sid), "steps loop without a wait: " + " -> ".join(loop)))
                elif t not in state:
                    visit(t, [*trail, t])
        state[sid] = 2

    for sid in sorted(instant):
        if sid not in state:
            visit(sid, [sid])
    return errors
