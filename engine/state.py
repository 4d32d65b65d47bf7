"""One user's journey state: the typed shape of what the engine reads, changes and returns.

Plain dicts (TypedDicts), so the adapters store them as JSON without a conversion step and the
engine copies them cheaply; the names say what each field is for. `engine.core` is the only code
that changes a state; adapters only store it and ask `next_wake`.
"""

from __future__ import annotations

import hashlib
from typing import Any, NotRequired, TypedDict


class Instance(TypedDict):
    """A user's current run through one journey."""

    version: int  # journey version the instance last ran under (edits: see core.journey_of)
    digest: str  # content digest of that definition (graph.Journey.digest)
    entry_no: int  # the user's n-th entry into this journey (part of idempotency keys, split buckets)
    step: str  # current step id
    since: int  # when the current step began (epoch ms)
    wake: int | None  # when the current step must run again (a wait's end, a timeout), or None
    moves: int  # steps taken so far: makes each visit of a step (loops) a distinct send key
    entered: int  # entry time
    trigger: dict[str, Any]  # the entering event's properties ({{ trigger.* }})
    trigger_event_id: str | None
    vars: dict[str, Any]  # saved call answers ({{ vars.* }})
    converted: bool
    call: NotRequired[str]  # key of the call request the current step waits for
    arm: NotRequired[str]  # "<split step>:<arm>" of the experiment this run took (experiment results)


class Attribution(TypedDict):
    """A journey the user left unconverted: a goal until `until` still counts (after_exit)."""

    entry_no: int
    until: int
    arm: NotRequired[str]
    key: NotRequired[list[Any]]  # a keyed goal's values (the cart the instance was about)


class EntryHistory(TypedDict):
    """How often and when the user entered a journey (once, lock, caps)."""

    count: int
    times: list[int]  # the latest entry times, as many as the entry cap needs
    members: NotRequired[str]  # the journey activation that admitted the user as a current member


class UserState(TypedDict):
    clock: int  # the newest time this user's state has run up to
    instances: dict[str, Instance]  # journey id -> active instance
    attribution: dict[str, Attribution]  # journey id -> open goal window after an exit
    entries: dict[str, EntryHistory]  # journey id -> entry history
    profile: dict[str, Any]  # profile attributes (from user_profiles and update steps)
    history: dict[str, list[int]]  # counter id -> sorted event times the conditions need
    seen: NotRequired[dict[str, list[list[Any]]]]  # keyed rule id -> [time, *values] (keyed waits, goals)
    # the last sends, newest last, one line each (push_recent, read with recent_sends). One text
    # for all of them: the record is loaded and stored with every batch that touches the user, and
    # one string costs less to parse than a list of ten (records of earlier builds hold a list)
    recent: NotRequired[str | list[Any]]
    seg_wake: NotRequired[int]  # when an event ages out of a segment's window (time-driven segments)
    sent: NotRequired[list[tuple[int, str]]]  # (time, channel) of marketing sends the frequency caps need


def new_state() -> UserState:
    return {"clock": 0, "instances": {}, "attribution": {}, "entries": {}, "profile": {}, "history": {}}


def next_wake(state: UserState | None) -> int | None:
    """The earliest time any of this user's instances must run, or None."""
    first = None
    if state:
        first = state.get("seg_wake")
        for i in state["instances"].values():
            w = i["wake"]
            if w is not None and (first is None or w < first):
                first = w
    return first


def clone(s: UserState) -> UserState:
    """A copy deep enough that the engine's changes never reach the caller's state."""
    return {
        "clock": s["clock"],
        "instances": {k: v.copy() for k, v in s["instances"].items()},
        "attribution": dict(s["attribution"]),
        "entries": dict(s["entries"]),
        "profile": dict(s["profile"]),
        "history": {k: list(v) for k, v in s["history"].items()},
        **({"sent": list(s["sent"])} if "sent" in s else {}),  # type: ignore[typeddict-item]
        **({"seg_wake": s["seg_wake"]} if "seg_wake" in s else {}),  # type: ignore[typeddict-item]
        **({"recent": _copy_recent(s["recent"])} if "recent" in s else {}),  # type: ignore[typeddict-item]
        **({"seen": {k: list(v) for k, v in s["seen"].items()}} if "seen" in s else {}),  # type: ignore[typeddict-item]
    }


def _copy_recent(recent: str | list[Any]) -> str | list[Any]:
    return recent if isinstance(recent, str) else list(recent)  # text is immutable


RecentSend = tuple[int, str, str, str, str, str | None]  # time, journey, step, channel, key, trigger event id


def idempotency_key(journey: str, user: str, instance: int, step: str, k: int) -> str:
    """A send's (or call's) idempotency key: the same visit of the same step in the same entry gives
    the same key, whichever worker computes it and however often."""
    raw = f"{journey}\x1f{user}\x1f{instance}\x1f{step}\x1f{k}".encode()
    return hashlib.sha256(raw).hexdigest()[:32]


def recent_send(t: int, journey: str, step: str, channel: str, entry_no: int, moves: int, trigger: str | None) -> str:
    """One line of `recent`: "time journey step channel entry_no.moves trigger-event-id". The key is
    not stored: `recent_sends` derives it from the entry number and the moves (a third of the text
    less in a record that is loaded and stored with every batch). Journey, step and channel ids
    have no spaces; the event id comes last and keeps its spaces, not its line breaks."""
    if trigger and "\n" in trigger:
        trigger = trigger.replace("\n", " ")
    return f"{t} {journey} {step} {channel} {entry_no}.{moves} {trigger or ''}"


def push_recent(st: UserState, line: str, keep: int) -> None:
    """Append a `recent_send` line, keeping the newest `keep`."""
    recent = st.get("recent")
    if isinstance(recent, list):  # an earlier build's list: its entries carry their keys
        recent = "\n".join(_legacy_line(e) for e in recent[-keep:])
    if recent and recent.count("\n") >= keep - 1:  # full: the oldest goes
        recent = recent[recent.index("\n") + 1 :] if "\n" in recent else ""
    st["recent"] = recent + "\n" + line if recent else line


def _legacy_line(e: Any) -> str:
    """An entry stored by an earlier build: "time journey step channel key trigger" or its list."""
    if isinstance(e, str):
        return e
    t, journey, step, channel, key, trigger = e
    return f"{t} {journey} {step} {channel} {key} {trigger or ''}"


def recent_sends(st: UserState, user: str) -> list[RecentSend]:
    """The user's last sends, newest last, each with its idempotency key."""
    recent = st.get("recent")
    if not recent:
        return []
    lines = recent.split("\n") if isinstance(recent, str) else [_legacy_line(e) for e in recent]
    out: list[RecentSend] = []
    for line in lines:
        t, journey, step, channel, key, trigger = line.split(" ", 5)
        if "." in key:  # entry_no.moves (an earlier build stored the key itself: hex, no dot)
            entry_no, moves = key.split(".")
            key = idempotency_key(journey, user, int(entry_no), step, int(moves))
        out.append((int(t), journey, step, channel, key, trigger or None))
    return out
