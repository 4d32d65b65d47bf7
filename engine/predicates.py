"""Property filters (`where:`) and conditions (`if:`, `branch`, segments), compiled to closures.

Compiling once at load means a malformed filter is reported with its file and line, and the hot
path only calls small functions. Comparisons never raise: a missing property or a value of the
wrong type simply does not match.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import orjson

from nudgeflow.engine.durations import parse_duration
from nudgeflow.engine.errors import NudgeflowError

Props = Mapping[str, Any]
Filter = Callable[[Props], bool]
OPS = ("eq", "ne", "gt", "gte", "lt", "lte", "in", "not_in", "contains", "starts_with", "exists")


class SpecError(NudgeflowError, ValueError):
    """A filter or condition is malformed; `path` is relative to where it was found."""

    def __init__(self, path: tuple[str | int, ...], problem: str) -> None:
        self.path, self.problem = path, problem
        super().__init__(problem)


def get_path(props: Props, dotted: str) -> Any:
    """props["a"]["b"] for "a.b"; a top-level key with a dot in it wins."""
    if dotted in props:
        return props[dotted]
    cur: Any = props
    for part in dotted.split("."):
        if not isinstance(cur, Mapping) or part not in cur:
            return _MISSING
        cur = cur[part]
    return cur


class _Missing:
    def __repr__(self) -> str:
        return "<missing>"


_MISSING: Any = _Missing()
MISSING: Any = _MISSING  # what get_path returns for a path that is not there


def _num(v: Any) -> float | None:
    if isinstance(v, bool):
        return None
    if isinstance(v, (int, float)):
        return float(v)
    if isinstance(v, str):
        try:
            return float(v)
        except ValueError:
            return None
    return None


TEMPLATE_TEXT = re.compile(r"\{\{|\{%")
REF = re.compile(r"^\{\{\s*(trigger|vars)\.([A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*)\s*\}\}$")
LITERAL_TEMPLATE = (
    "template text in a filter would be compared as literal text: filters take plain values "
    "(wait_for, goal and exit_when filters may compare a property with {{ trigger.<prop> }} or "
    "{{ vars.<name>.<field> }}, as the whole value or eq:)"
)


def _no_template(want: Any) -> None:
    items = want if isinstance(want, list) else [want]
    if any(isinstance(w, str) and TEMPLATE_TEXT.search(w) for w in items):
        raise SpecError((), LITERAL_TEMPLATE)


def _cmp(op: str, want: Any) -> Callable[[Any], bool]:
    _no_template(want)
    if op == "exists":
        flag = bool(want)
        return lambda v: (v is not _MISSING and v is not None) == flag
    if op == "eq":
        return lambda v: v is not _MISSING and (v == want or (_num(v) is not None and _num(v) == _num(want)))
    if op == "ne":
        return lambda v: not (v is not _MISSING and (v == want or (_num(v) is not None and _num(v) == _num(want))))
    if op in ("gt", "gte", "lt", "lte"):
        w = _num(want)
        if w is None:
            if not isinstance(want, str):
                raise SpecError((op,), f"'{op}' needs a number or text, not {want!r}")
            ws = want  # text comparison, e.g. ISO dates compare correctly as text
            return {
                "gt": lambda v: isinstance(v, str) and v > ws,
                "gte": lambda v: isinstance(v, str) and v >= ws,
                "lt": lambda v: isinstance(v, str) and v < ws,
                "lte": lambda v: isinstance(v, str) and v <= ws,
            }[op]
        num = _num
        return {
            "gt": lambda v: (n := num(v)) is not None and n > w,
            "gte": lambda v: (n := num(v)) is not None and n >= w,
            "lt": lambda v: (n := num(v)) is not None and n < w,
            "lte": lambda v: (n := num(v)) is not None and n <= w,
        }[op]
    if op in ("in", "not_in"):
        if not isinstance(want, list):
            raise SpecError((op,), f"'{op}' needs a list, e.g. {op}: [a, b]")
        options = list(want)

        def inside(v: Any) -> bool:
            return v is not _MISSING and any(v == o or (_num(v) is not None and _num(v) == _num(o)) for o in options)

        return inside if op == "in" else (lambda v: not inside(v))
    if op == "contains":

        def contains(v: Any) -> bool:
            if isinstance(v, str) and isinstance(want, str):
                return want.lower() in v.lower()
            return isinstance(v, list) and want in v

        return contains
    if op == "starts_with":
        if not isinstance(want, str):
            raise SpecError((op,), "'starts_with' needs text")
        return lambda v: isinstance(v, str) and v.startswith(want)
    raise SpecError((op,), f"unknown operator '{op}'; use one of {', '.join(OPS)}")


def compile_where(spec: Any) -> Filter:
    """{prop: value | {op: value}} with any/all/not; an empty mapping matches everything."""
    if spec is None:
        return _always
    if not isinstance(spec, Mapping):
        raise SpecError((), f"a filter must be a mapping of property to value, not {spec!r}")
    parts: list[Filter] = []
    for key, want in spec.items():
        if key in ("any", "all"):
            if not isinstance(want, list) or not want:
                raise SpecError((key,), f"'{key}' needs a non-empty list of filters")
            subs = [_nest((key, i), compile_where, w) for i, w in enumerate(want)]
            parts.append(_any(subs) if key == "any" else _all(subs))
        elif key == "not":
            sub = _nest((key,), compile_where, want)
            parts.append(_negate(sub))
        elif isinstance(want, Mapping):
            if not want:
                raise SpecError((key,), f"empty operator mapping for '{key}'")
            checks = [_nest((key,), _cmp, op, v) for op, v in want.items()]
            parts.append(_prop(key, checks))
        elif isinstance(want, list):
            raise SpecError((key,), f"a list needs an operator: {key}: {{in: [...]}}")
        else:
            parts.append(_prop(key, [_nest((key,), _cmp, "eq", want)]))
    return _all(parts)


@dataclass(frozen=True, slots=True)
class Ref:
    """`prop: "{{ trigger.cart_id }}"` in a rule's filter: the event's `prop` must equal the value
    the instance holds at `root.path` (its trigger's property, or a saved call answer). This keys a
    wait, goal or exit to the item the user entered with (this cart, this booking)."""

    prop: str
    root: str  # "trigger" | "vars"
    path: str


def split_refs(spec: Any) -> tuple[Any, tuple[Ref, ...]]:
    """A rule filter -> (the plain filter, the references to the instance), references taken from
    top-level `prop: "{{ trigger.x }}"` or `prop: {eq: "{{ trigger.x }}"}` only; template text
    anywhere else is an error (compile_where reports it with its path)."""
    if not isinstance(spec, Mapping):
        return spec, ()
    plain, refs = {}, []
    for key, want in spec.items():
        ref = want.get("eq") if isinstance(want, Mapping) and len(want) == 1 else want
        m = REF.match(ref) if isinstance(ref, str) and key not in ("any", "all", "not") else None
        if m:
            refs.append(Ref(key, m.group(1), m.group(2)))
        else:
            plain[key] = want
    return plain, tuple(refs)


def ref_values(refs: Sequence[Ref], trigger: Props, vars_: Props) -> list[Any]:
    """The values an instance's references stand for (missing: _MISSING, which matches nothing)."""
    return [get_path(trigger if r.root == "trigger" else vars_, r.path) for r in refs]


def refs_match(refs: Sequence[Ref], props: Props, values: Sequence[Any]) -> bool:
    for r, want in zip(refs, values, strict=True):
        v = get_path(props, r.prop)
        if v is _MISSING or want is _MISSING or want is None or not _same(v, want):
            return False
    return True


def _same(v: Any, want: Any) -> bool:
    return bool(v == want or ((n := _num(v)) is not None and n == _num(want)))


def _nest(prefix: tuple[str | int, ...], fn: Callable[..., Any], *args: Any) -> Any:
    try:
        return fn(*args)
    except SpecError as e:
        raise SpecError(prefix + e.path, e.problem) from None


def _negate(f: Filter) -> Filter:
    return lambda p: not f(p)


def _prop(key: str, checks: list[Callable[[Any], bool]]) -> Filter:
    if len(checks) == 1:
        (check,) = checks
        return lambda p: check(get_path(p, key))
    return lambda p: all(c(get_path(p, key)) for c in checks)


def _always(_: Props) -> bool:
    return True


def _never(_: Props) -> bool:
    return False


def _all(fs: Sequence[Filter]) -> Filter:
    if not fs:
        return _always
    if len(fs) == 1:
        return fs[0]
    return lambda p: all(f(p) for f in fs)


def _any(fs: Sequence[Filter]) -> Filter:
    return lambda p: any(f(p) for f in fs)


# ----------------------------------------------------------------------------------------------
# Conditions over a user: profile attributes, event history, segments, reachability.


class EvalContext(Protocol):
    now: int
    profile: Mapping[str, Any]
    trigger: Mapping[str, Any]
    vars: Mapping[str, Any]

    def count(self, counter: str, since: int) -> int: ...

    def in_segment(self, name: str) -> bool: ...


Cond = Callable[[EvalContext], bool]


@dataclass(frozen=True)
class Counter:
    """An event history the engine keeps per user: timestamps of events matching (event, where)."""

    id: str
    event: str
    where: Filter = field(compare=False)
    keep_ms: int | None  # None: forever (only the newest `keep_n` are kept)
    keep_n: int
    keys: tuple[str, ...] = ()  # properties kept with each time (a keyed rule's history: `seen`)


def counter_id(event: str, where: Any) -> str:
    """Stable id of (event, filter): history survives journey edits that keep the same filter."""
    canon = orjson.dumps([event, where], option=orjson.OPT_SORT_KEYS, default=str)
    return event + "#" + hashlib.sha1(canon, usedforsecurity=False).hexdigest()[:8]


class CounterRegistry:
    """Collects the histories that conditions and rules need, merging equal ones."""

    def __init__(self) -> None:
        self.specs: dict[str, tuple[str, Filter, int | None, int, tuple[str, ...]]] = {}
        # (counter, window) of every `has_done ... within`: where membership changes with time alone
        self.windows: list[tuple[str, int]] = []
        self.segment_windows: set[tuple[str, int]] = set()  # the windows segments use

    def need(self, event: str, where: Any, keep_ms: int | None, keep_n: int, keys: tuple[str, ...] = ()) -> str:
        cid = counter_id(event, where if not keys else {"where": where, "keys": list(keys)})
        if cid in self.specs:
            _, f, k, n, _ = self.specs[cid]
            keep = None if (k is None or keep_ms is None) else max(k, keep_ms)
            self.specs[cid] = (event, f, keep, max(n, keep_n), keys)
        else:
            try:
                f = compile_where(where)
            except SpecError:  # reported with its path where the rule's own filter is compiled
                f = _never
            self.specs[cid] = (event, f, keep_ms, keep_n, keys)
        return cid

    def counters(self) -> tuple[Counter, ...]:
        return tuple(Counter(cid, e, f, k, n, ks) for cid, (e, f, k, n, ks) in sorted(self.specs.items()))


MAX_HISTORY = 64  # per counter and user: bounds state size whatever a condition asks for


def compile_condition(spec: Any, reg: CounterRegistry, segments: set[str] | None) -> Cond:
    """attribute / in_segment / has_done / reachable / trigger / vars / all / any / not."""
    if not isinstance(spec, Mapping) or not spec:
        raise SpecError((), "a condition must be a mapping such as {attribute: score, gt: 10}")
    keys = set(spec)
    if keys & {"all", "any"} and len(keys) == 1:
        (key,) = keys
        items = spec[key]
        if not isinstance(items, list) or not items:
            raise SpecError((key,), f"'{key}' needs a non-empty list of conditions")
        subs = [_nest((key, i), compile_condition, c, reg, segments) for i, c in enumerate(items)]
        return (lambda c: all(s(c) for s in subs)) if key == "all" else (lambda c: any(s(c) for s in subs))
    if keys == {"not"}:
        sub = _nest(("not",), compile_condition, spec["not"], reg, segments)
        return lambda c: not sub(c)
    if "attribute" in keys:
        name = spec["attribute"]
        if not isinstance(name, str):
            raise SpecError(("attribute",), "'attribute' needs an attribute name")
        ops = {k: v for k, v in spec.items() if k != "attribute"} or {"exists": True}
        checks = [_nest((op,), _cmp, op, v) for op, v in ops.items()]
        return lambda c: all(ch(get_path(c.profile, name)) for ch in checks)
    if keys == {"in_segment"}:
        seg = spec["in_segment"]
        if segments is not None and seg not in segments:
            raise SpecError(("in_segment",), f"unknown segment '{seg}'; define it in segments.yaml")
        return lambda c: c.in_segment(seg)
    if keys == {"reachable"}:
        channel = spec["reachable"]
        from nudgeflow.engine.schema import CHANNELS

        if channel not in CHANNELS:
            raise SpecError(("reachable",), f"unknown channel '{channel}'; use one of {', '.join(CHANNELS)}")
        return lambda c: reachable(c.profile, channel)
    if "has_done" in keys:
        return _has_done(spec, reg)
    if keys in ({"trigger"}, {"vars"}):
        (key,) = keys
        f = _nest((key,), compile_where, spec[key])
        return (lambda c: f(c.trigger)) if key == "trigger" else (lambda c: f(c.vars))
    raise SpecError(
        (),
        f"unknown condition {sorted(keys)}; use attribute, in_segment, has_done, "
        "reachable, trigger, vars, all, any or not",
    )


def _has_done(spec: Mapping[str, Any], reg: CounterRegistry) -> Cond:
    allowed = {"has_done", "where", "within", "at_least", "at_most"}
    if extra := set(spec) - allowed:
        raise SpecError((sorted(extra)[0],), f"unknown field in has_done; allowed: {', '.join(sorted(allowed))}")
    event = spec["has_done"]
    if not isinstance(event, str):
        raise SpecError(("has_done",), "'has_done' needs an event name")
    within = _nest(("within",), parse_duration, spec["within"]) if "within" in spec else None
    at_least, at_most = spec.get("at_least"), spec.get("at_most")
    for k, v in (("at_least", at_least), ("at_most", at_most)):
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 0):
            raise SpecError((k,), f"'{k}' needs a whole number >= 0")
    if at_least is None and at_most is None:
        at_least = 1
    need = max(at_least or 0, (at_most + 1) if at_most is not None else 0, 1)
    if need > MAX_HISTORY:
        raise SpecError(("at_least",), f"counts above {MAX_HISTORY - 1} are not kept per user")
    cid = reg.need(event, spec.get("where") or {}, within, need)
    if within is not None:
        reg.windows.append((cid, within))
    lo, hi = at_least, at_most

    def check(c: EvalContext) -> bool:
        n = c.count(cid, c.now - within if within is not None else -(2**62))
        return (lo is None or n >= lo) and (hi is None or n <= hi)

    return check


def reachable(profile: Mapping[str, Any], channel: str) -> bool:
    """A channel is reachable unless the profile says otherwise (reachable_<channel>: false, after a
    bounce) or the user opted out of it (unsubscribed_<channel>: true)."""
    if not profile:  # most users: nothing said about any channel
        return True
    return profile.get(f"reachable_{channel}", True) is not False and profile.get(f"unsubscribed_{channel}") is not True
