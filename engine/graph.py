"""The compiled, immutable journey graph the engine runs.

Built once by `engine.compiler` from validated journey files. Every step names its successors by
id; 'end' (the constant END) leaves the journey.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, assert_never

from nudgeflow.engine.predicates import Cond, Counter, Filter, Ref
from nudgeflow.engine.templates import Text

END = "end"


@dataclass(frozen=True, slots=True)
class Message:
    channel: str
    template: str | None
    content: Mapping[str, Text]
    data: Mapping[str, Any]
    fallback: Message | None
    to: Text | None = None  # None: the channel's profile attribute (RECIPIENT_ATTRIBUTE)
    expires_ms: int = 86_400_000


@dataclass(frozen=True, slots=True)
class Send:
    id: str
    message: Message
    next: str


@dataclass(frozen=True, slots=True)
class Wait:
    id: str
    ms: int
    next: str


@dataclass(frozen=True, slots=True)
class WaitUntil:
    id: str
    at: int | None  # epoch ms, or None when relative to an attribute
    attribute: str | None
    offset: int
    if_missing: str  # "continue" | "end"
    next: str


@dataclass(frozen=True, slots=True)
class WaitWindow:
    id: str
    days: frozenset[int]  # 0 = Monday
    start_min: int
    end_min: int
    timezone: str  # IANA name, or "attribute:<name>"
    next: str


@dataclass(frozen=True, slots=True)
class WaitFor:
    id: str
    event: str
    where: Filter = field(compare=False)
    counter: str  # history id of (event, where): catches an event that arrived before the step
    timeout: int
    on_timeout: str
    next: str
    refs: tuple[Ref, ...] = ()  # keyed to the instance: e.g. the cart id of the trigger


@dataclass(frozen=True, slots=True)
class Branch:
    id: str
    cases: tuple[tuple[Cond, str], ...]
    otherwise: str


@dataclass(frozen=True, slots=True)
class Split:
    id: str
    arms: tuple[tuple[int, str], ...]  # (cumulative percent upper bound, next); control -> END


@dataclass(frozen=True, slots=True)
class Update:
    id: str
    set: Mapping[str, Any]
    increment: Mapping[str, float]
    unset: tuple[str, ...]
    next: str


@dataclass(frozen=True, slots=True)
class Call:
    id: str
    url: Text
    method: str
    headers: Mapping[str, Any]
    body: Any
    save_as: str
    timeout: int
    on_error: str
    next: str


@dataclass(frozen=True, slots=True)
class End:
    id: str


Node = Send | Wait | WaitUntil | WaitWindow | WaitFor | Branch | Split | Update | Call | End
BLOCKING = (Wait, WaitUntil, WaitWindow, WaitFor, Call)


def successors(n: Node) -> list[tuple[str, str]]:
    """(field, target) pairs of a node."""
    match n:
        case End():
            return []
        case Branch():
            return [("branch", t) for _, t in n.cases] + [("otherwise", n.otherwise)]
        case Split():
            return [("split", t) for _, t in n.arms]
        case WaitFor():
            return [("next", n.next), ("on_timeout", n.on_timeout)]
        case Call():
            return [("next", n.next), ("on_error", n.on_error)]
        case Send() | Wait() | WaitUntil() | WaitWindow() | Update():
            return [("next", n.next)]
        case _:
            assert_never(n)


@dataclass(frozen=True, slots=True)
class Rule:
    """An event rule (goal, exit): event name, filter, and the history id that remembers it."""

    event: str
    where: Filter = field(compare=False)
    counter: str
    refs: tuple[Ref, ...] = ()  # keyed to the instance (predicates.Ref); its history keeps the values


@dataclass(frozen=True, slots=True)
class Entry:
    events: tuple[str, ...]
    where: Filter = field(compare=False)
    segment_entered: str | None = None
    segment_left: str | None = None
    attribute_changed: str | None = None
    enrolled: bool = False
    audience: tuple[str, ...] = ()
    once: bool = False
    lock: int | None = None
    cap_max: int | None = None
    cap_per: int | None = None
    restart: bool = False
    starts_at: int | None = None
    ends_at: int | None = None
    include_current_members: bool = False  # segment_entered: admit the segment's members at activation
    instance_per: str | None = None  # a trigger property: one instance per value (each with its timers)
    # no schedule, audience, eligibility, lock or cap: only "already in the journey" can refuse
    open: bool = field(init=False)

    def __post_init__(self) -> None:
        plain = not (self.starts_at or self.ends_at or self.audience or self.once or self.lock or self.cap_max)
        object.__setattr__(self, "open", plain)


@dataclass(frozen=True, slots=True)
class Goal:
    rule: Rule
    within: int | None
    exit: bool


@dataclass(frozen=True, slots=True)
class Journey:
    id: str
    name: str
    version: int
    status: str  # active | paused | stopped
    entry: Entry
    goal: Goal | None
    exits: tuple[Rule, ...]
    steps: Mapping[str, Node]
    first: str
    file: str
    digest: str = ""  # content hash of the file (compiler.content_digest): edits without a version bump
    category: str = "marketing"  # marketing | transactional (exempt from frequency caps)
    when_capped: str = "skip"  # skip | delay
    listens: frozenset[str] = field(init=False)  # events that matter to a user in it: goal, exits, wait_for
    activation: str = field(init=False)  # "<version>:<digest>": a current-members scan runs once per value

    def __post_init__(self) -> None:
        names = {r.event for r in self.exits} | {n.event for n in self.steps.values() if isinstance(n, WaitFor)}
        if self.goal is not None:
            names.add(self.goal.rule.event)
        object.__setattr__(self, "listens", frozenset(names))
        object.__setattr__(self, "activation", f"{self.version}:{self.digest}")


@dataclass(frozen=True, slots=True)
class Cap:
    max: int
    per_ms: int
    channel: str | None  # None: all channels


@dataclass(frozen=True)
class JourneySet:
    """All loaded journeys, indexed for the hot path."""

    journeys: Mapping[str, Journey]
    segments: Mapping[str, Cond]
    counters: tuple[Counter, ...]
    caps: tuple[Cap, ...] = ()  # frequency caps of marketing sends, per user
    # (counter, window) pairs segments count within: membership can change when an event ages out
    segment_windows: tuple[tuple[str, int], ...] = ()
    window_counters: frozenset[str] = field(init=False)
    by_trigger: Mapping[str, tuple[Journey, ...]] = field(init=False)
    counters_by_event: Mapping[str, tuple[Counter, ...]] = field(init=False)
    watched: frozenset[str] = field(init=False)  # event names that can change any state
    segment_triggered: tuple[Journey, ...] = field(init=False)

    def __post_init__(self) -> None:
        by_trigger: dict[str, list[Journey]] = {}
        for j in self.journeys.values():
            for name in j.entry.events:
                by_trigger.setdefault(name, []).append(j)
        by_event: dict[str, list[Counter]] = {}
        for c in self.counters:
            by_event.setdefault(c.event, []).append(c)
        watched = set(by_trigger) | set(by_event)
        seg = tuple(j for j in self.journeys.values() if j.entry.segment_entered or j.entry.segment_left)
        object.__setattr__(self, "by_trigger", {k: tuple(v) for k, v in by_trigger.items()})
        object.__setattr__(self, "counters_by_event", {k: tuple(v) for k, v in by_event.items()})
        object.__setattr__(self, "segment_triggered", seg)
        object.__setattr__(self, "watched", frozenset(watched))
        object.__setattr__(
            self, "window_counters", frozenset(c for c, _ in self.segment_windows) if seg else frozenset()
        )
