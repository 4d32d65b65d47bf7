"""The journey engine: `process(state, input, now, journeys) -> Result(state, effects)`.

Pure and deterministic: no I/O, no clock of its own, no randomness (splits hash the user). The
state is one user's plain, JSON-serialisable dict (see `new_state`); the input state is never
modified. The caller provides `now`: the event time for events, the due time for ticks.

Timers are part of the state: each active instance that waits has a `wake` time, and the user's
next wake-up is the smallest of them. A Tick runs everything due at `now`; a Tick with nothing
due changes nothing, so duplicated or stale timer firings are harmless. The effects say when the
user's wake-up time moved (TimerSet / TimerCleared) so an adapter can keep an index by due time.

Semantics worth knowing (README "Journey semantics" has the full list):
- Before an event is applied, every step due at or before its time runs (an event that comes
  after a deadline sees the deadline already passed, exactly like a timer would have).
- Goals and exits are checked before anything else for active users; an event can convert a
  user in one journey and enter them into another.
- Late events: histories remember the newest time of each goal, exit and wait-for event, so an
  exit event that was processed before the entry event but happened after it still exits.
- Editing a journey (new version): users continue at the same step id; users on a removed step
  leave the journey (reason step_removed). Paused journeys take no entries and hold users in
  place (re-checked hourly); stopped journeys take no entries and release users without sending.
"""

from __future__ import annotations

import bisect
import datetime as dt
import hashlib
import json
import zoneinfo
from collections.abc import Mapping
from typing import Any, assert_never

from nudgeflow.engine import graph as g
from nudgeflow.engine.io import (
    CallRequest,
    CallResult,
    Count,
    CountKey,
    Effect,
    Enroll,
    Event,
    Feedback,
    Input,
    MemberCheck,
    ProfileChanged,
    ProfileUpdate,
    Result,
    SendRequest,
    Sink,
    Tick,
    TimerCleared,
    TimerSet,
)
from nudgeflow.engine.predicates import MAX_HISTORY, MISSING, Ref, get_path, reachable, ref_values, refs_match
from nudgeflow.engine.state import (
    Instance,
    UserState,
    clone,
    idempotency_key,
    new_state,
    next_wake,
    push_recent,
    recent_send,
)
from nudgeflow.engine.templates import RenderError, render_value
from nudgeflow.engine.timeparse import iso_to_ms

__all__ = ["UNKNOWN_WAKE", "EffectList", "apply", "idempotency_key", "new_state", "next_wake", "process", "segments_of"]

MAX_STEPS_PER_RUN = 200
PAUSE_RECHECK_MS = 3_600_000
RECENT_SENDS = 10  # kept per user for `nudgeflow inspect`


def process(state: UserState | None, inp: Input, now: int, js: g.JourneySet) -> Result:
    """Apply one input at time `now` to one user's state; the input state is not changed."""
    if isinstance(inp, Event) and inp.name not in js.watched:
        wake = next_wake(state)
        if wake is None or wake > now:  # fast path: nothing to do for this event
            return Result(state if state else new_state(), [], changed=False)
    st = clone(state) if state else new_state()
    effects = EffectList()
    apply(st, inp, now, js, effects)
    return Result(st, effects.effects)


UNKNOWN_WAKE = -1  # `apply`'s `wake` when the caller does not know the state's next wake-up


def apply(
    st: UserState,
    inp: Input,
    now: int,
    js: g.JourneySet,
    sink: Sink,
    wall: int | None = None,
    wake: int | None = UNKNOWN_WAKE,
) -> int | None:
    """`process` in place: change `st` and report effects to `sink` (the worker's batch core owns
    its states for the length of a batch, so it saves the copy). `wall`: the processing time, when
    it runs ahead of the journey time (a worker catching up): a call's answer comes in processing
    time, so the call's timeout counts from there. `wake`: `next_wake(st)`, when the caller knows
    it (what the previous `apply` to this state returned). Returns the state's next wake-up.

    Feedback (what became of a message) comes in processing time, not journey time: it applies at
    the state's own clock and never moves it. A worker catching up reads a sender's feedback from
    minutes later beside events from before a wait ended; at its own time it would run that wait
    ahead of the events that end it (a push to someone who bought meanwhile)."""
    if inp.__class__ is Feedback:
        now = st["clock"]
    run = _Run(st, inp.user_id, js, sink, wake, wall)
    run.apply(inp, now)
    return run.finish(now)


def segments_of(st: UserState, user: str, js: g.JourneySet, t: int) -> dict[str, bool]:
    """Which segments the user is in at `t` (read-only: `nudgeflow inspect`)."""
    run = _Run(clone(st), user, js, EffectList())
    return {name: run.in_segment(name, t) for name in sorted(js.segments)}


class EffectList:
    """A Sink that keeps every effect as an object, in order (`process`, `simulate`, tests)."""

    __slots__ = ("effects",)

    def __init__(self) -> None:
        self.effects: list[Effect] = []

    def count(self, c: CountKey, /) -> None:
        self.effects.append(Count(*c))

    def emit(self, fx: SendRequest | CallRequest | ProfileChanged) -> None:
        self.effects.append(fx)

    def timer(self, user: str, old: int | None, new: int | None) -> None:
        if old is not None:
            self.effects.append(TimerCleared(user, old))
        if new is not None:
            self.effects.append(TimerSet(user, new))


class _Run:
    """One call of `apply`: the state being changed, where effects go, and the event being applied.

    Inputs are dispatched by `apply` (one `on_<input>` method per input kind), steps by `run`
    (one `run_<step>` method per step kind) and timers by `wake`; every dispatch is a `match`
    that mypy checks for exhaustiveness, so a new kind cannot be forgotten silently.
    """

    __slots__ = (
        "count",
        "event_props",
        "js",
        "old_wake",
        "seg_before",
        "seg_dirty",
        "seg_tracking",
        "sink",
        "st",
        "user",
        "wall",
    )

    def __init__(
        self,
        st: UserState,
        user: str,
        js: g.JourneySet,
        sink: Sink,
        wake: int | None = UNKNOWN_WAKE,
        wall: int | None = None,
    ) -> None:
        self.old_wake = next_wake(st) if wake == UNKNOWN_WAKE else wake
        self.st, self.user, self.js, self.sink = st, user, js, sink
        self.count = sink.count
        self.event_props: Mapping[str, Any] | None = None
        # segment membership as it was before this input changed the profile or a history (taken
        # lazily, at the first such change): None while nothing that segments read has changed
        self.seg_before: dict[str, bool] | None = None
        self.seg_tracking = False  # on while an event or a profile update is applied
        self.seg_dirty = False  # a segment window's history changed: find the next window edge
        self.wall = wall  # processing time (the worker), or None (simulate: virtual)

    # --- inputs ---------------------------------------------------------------------------

    def apply(self, inp: Input, now: int) -> None:
        clock = self.st["clock"]
        if self.old_wake is not None and self.old_wake <= now:
            self.advance(now)
        match inp:
            case Event():
                self.on_event(inp, now)
            case ProfileUpdate():
                self.on_profile(inp.attributes, now)
            case Enroll():
                self.on_enroll(inp, now)
            case CallResult():
                self.on_call_result(inp, now)
            case Feedback():
                self.on_feedback(inp)
            case MemberCheck():
                self.on_member_check(inp, now)
            case Tick():
                pass  # advance() above ran everything due
            case _:
                assert_never(inp)
        if clock > now:  # a late input may have started waits that are already over
            self.advance(clock)

    def finish(self, now: int) -> int | None:
        st = self.st
        if now > st["clock"]:
            st["clock"] = now
        attribution = st["attribution"]
        if attribution:
            clock = st["clock"]
            for jid in [j for j, d in attribution.items() if d["until"] < clock]:
                del attribution[jid]
        if self.seg_dirty:
            self.next_segment_edge(st["clock"])
        new = next_wake(st)
        if new != self.old_wake:
            self.sink.timer(self.user, self.old_wake, new)
        return new

    def on_event(self, ev: Event, t: int) -> None:
        st, js = self.st, self.js
        self.event_props = ev.props
        self.seg_tracking = True
        instances, name, props = st["instances"], ev.name, ev.props
        counters = js.counters_by_event.get(name)
        if counters:
            for c in counters:
                if c.where(props):
                    self.touch_segments(t)
                    if c.id in js.window_counters:
                        self.seg_dirty = True
                    if c.keys:
                        self.remember_values(c.id, ev.ts, [get_path(props, k) for k in c.keys])
                    else:
                        self.remember(c.id, ev.ts, c.keep_ms, c.keep_n)
        for ik in (sorted(instances) if len(instances) > 1 else list(instances)) if instances else ():
            j = self.journey_of(ik, t)
            if j is None or name not in j.listens:
                continue
            inst = instances[ik]
            node = j.steps[inst["step"]]
            # a step waiting for exactly this event takes its "performed" branch, even when the
            # event is also the goal or an exit: the flow says explicitly what happens next
            performed = (
                isinstance(node, g.WaitFor)
                and node.event == name
                and node.where(props)
                and (not node.refs or _keyed(node.refs, props, inst))
            )
            goal = j.goal
            if goal and goal.rule.event == name and goal.rule.where(props) and _keyed(goal.rule.refs, props, inst):
                self.convert(j, ik, t)
                if goal.exit and not performed:
                    self.exit(j, ik, "converted", t)
                    continue
            if not performed and self.exit_rule_matches(j, name, props, inst):
                self.exit(j, ik, "exit_event", t)
                continue
            if performed:
                assert isinstance(node, g.WaitFor)
                self.count(("step", j.id, f"{node.id}:performed"))
                self.move(j, ik, node.next, t)
        for ik, done in list(st["attribution"].items()) if st["attribution"] else ():
            j = js.journeys.get(journey_id(ik))
            if (
                j
                and j.goal
                and j.goal.rule.event == ev.name
                and t <= done["until"]
                and j.goal.rule.where(ev.props)
                and (not j.goal.rule.refs or refs_match(j.goal.rule.refs, ev.props, done.get("key", ())))
            ):
                done = st["attribution"].pop(ik)
                self.count(("converted", j.id, "after_exit"))
                if "arm" in done:
                    self.count(("experiment", j.id, f"{done['arm']}:converted"))
        for j in js.by_trigger.get(name, ()):
            if j.entry.where(props):
                self.try_enter(j, t, dict(props), ev.event_id)
        if self.seg_before is not None:
            self.segment_entries(t)
        self.seg_tracking = False
        self.event_props = None

    @staticmethod
    def exit_rule_matches(j: g.Journey, name: str, props: Mapping[str, Any], inst: Instance) -> bool:
        for r in j.exits:  # noqa: SIM110 - a loop: no generator made per event
            if r.event == name and r.where(props) and (not r.refs or _keyed(r.refs, props, inst)):
                return True
        return False

    def on_profile(self, attrs: Mapping[str, Any], t: int) -> None:
        self.seg_tracking = True
        profile = self.st["profile"]
        changed = {}
        for k, v in attrs.items():
            if profile.get(k) != v:
                self.touch_segments(t)
                changed[k] = v
                if v is None:
                    profile.pop(k, None)
                else:
                    profile[k] = v
        for j in self.js.journeys.values():
            if j.entry.attribute_changed and j.entry.attribute_changed in changed:
                self.try_enter(j, t, dict(attrs), None)
        self.segment_entries(t)

    def on_enroll(self, inp: Enroll, t: int) -> None:
        j = self.js.journeys.get(inp.journey)
        if j is not None and j.entry.enrolled:
            self.try_enter(j, t, dict(inp.props), None)
        elif j is not None:
            self.count(("skipped", j.id, "not_enrollable"))
        else:  # counted, not dropped silently (the journey label stays bounded: empty)
            self.count(("skipped", "", "unknown_journey"))

    def on_member_check(self, inp: MemberCheck, t: int) -> None:
        """Admit a current member of the segment of a journey that just activated, once per
        activation (version and digest): a scan repeated after a restart admits nobody twice."""
        j, st = self.js.journeys.get(inp.journey), self.st
        if j is None or not j.entry.include_current_members or j.entry.segment_entered is None:
            return
        hist = st["entries"].get(j.id)
        if hist is not None and hist.get("members") == j.activation:
            return
        if not self.in_segment(j.entry.segment_entered, t):
            return
        self.count(("admitted", j.id, "member"))
        self.try_enter(j, t, {}, None)
        hist = st["entries"].get(j.id)
        if hist is not None and hist["times"] and hist["times"][-1] == t:
            hist["members"] = j.activation

    def on_feedback(self, inp: Feedback) -> None:
        profile, status = self.st["profile"], inp.status
        if status in ("unreachable", "bounced", "reachable"):
            profile[f"reachable_{inp.channel}"] = status == "reachable"
        elif status == "unsubscribed":
            profile[f"unsubscribed_{inp.channel}"] = True
        elif status == "subscribed":
            profile.pop(f"unsubscribed_{inp.channel}", None)
        if inp.journey and inp.step:
            self.count(("feedback", inp.journey, f"{inp.step}:{status}"))

    def on_call_result(self, res: CallResult, t: int) -> None:
        for ik, inst in list(self.st["instances"].items()):
            if inst.get("call") != res.key:
                continue
            j = self.journey_of(ik, t)
            node = j.steps[inst["step"]] if j else None
            if j is None or not isinstance(node, g.Call):
                return
            if res.ok:
                inst["vars"] = {**inst["vars"], node.save_as: res.body}
                self.move(j, ik, node.next, t)
            else:
                self.count(("step", j.id, f"{node.id}:error"))
                self.move(j, ik, node.on_error, t)
            return

    # --- segments --------------------------------------------------------------------------

    def segments_now(self, t: int) -> dict[str, bool]:
        names = {n for j in self.js.segment_triggered for n in (j.entry.segment_entered, j.entry.segment_left) if n}
        return {n: self.in_segment(n, t) for n in sorted(names)}

    def touch_segments(self, t: int) -> None:
        """Called before the profile or a history changes: remember segment membership as it was."""
        if self.seg_tracking and self.seg_before is None and self.js.segment_triggered:
            self.seg_before = self.segments_now(t)

    def segment_entries(self, t: int) -> None:
        """Enter segment-triggered journeys whose segment membership flipped since touch_segments."""
        before, self.seg_before, self.seg_tracking = self.seg_before, None, False
        if before is None:
            return
        after = self.segments_now(t)
        for j in self.js.segment_triggered:
            e = j.entry
            if (e.segment_entered and after[e.segment_entered] and not before[e.segment_entered]) or (
                e.segment_left and before[e.segment_left] and not after[e.segment_left]
            ):
                self.try_enter(j, t, {}, None)

    def next_segment_edge(self, after: int) -> None:
        """Set `seg_wake` to the first moment after `after` when an event leaves the window of a
        segment's `has_done ... within` (membership may change then without any new input)."""
        self.seg_dirty = False
        history, edge = self.st["history"], None
        for cid, within in self.js.segment_windows:
            for ts in history.get(cid, ()):
                e = ts + within + 1  # counted while now - within <= ts
                if e > after:
                    edge = e if edge is None or e < edge else edge
                    break
        if edge is None:
            self.st.pop("seg_wake", None)
        else:
            self.st["seg_wake"] = edge

    def segment_edge(self, t: int) -> None:
        """A window edge came: enter the journeys whose segment membership flipped with it."""
        self.seg_before = self.segments_now(t - 1)
        self.segment_entries(t)
        self.next_segment_edge(t)

    def in_segment(self, name: str, t: int, inst: Instance | None = None) -> bool:
        cond = self.js.segments.get(name)
        return bool(cond and cond(_Ctx(self, t, inst)))

    # --- histories -------------------------------------------------------------------------

    def remember(self, cid: str, ts: int, keep_ms: int | None, keep_n: int) -> None:
        history = self.st["history"]
        if keep_n == 1 and keep_ms is None:  # the newest time only (goals, exits): what the rest does, directly
            h = history.get(cid)
            if h is None:
                history[cid] = [ts]
                return
            if len(h) == 1:
                if ts > h[0]:
                    h[0] = ts
                return
        h = history.setdefault(cid, [])
        bisect.insort(h, ts)
        if keep_ms is not None:
            horizon = max(h[-1], self.st["clock"]) - keep_ms
            while h and h[0] < horizon:
                h.pop(0)
        del h[: max(0, len(h) - min(keep_n, MAX_HISTORY))]

    def remember_values(self, cid: str, ts: int, values: list[Any]) -> None:
        """A keyed rule's history: each matching event's time with the values it is keyed on."""
        seen = self.st.setdefault("seen", {}).setdefault(cid, [])
        bisect.insort(seen, [ts, *values], key=lambda e: e[0])
        del seen[: max(0, len(seen) - MAX_HISTORY)]

    def last_keyed(self, cid: str, refs: tuple[Ref, ...], inst: Instance) -> int | None:
        """The newest time of an event in `cid`'s keyed history that matches the instance."""
        seen = self.st.get("seen", {}).get(cid)
        if not seen:
            return None
        want = ref_values(refs, inst["trigger"], inst["vars"])
        for e in reversed(seen):
            if refs_match(refs, dict(zip([r.prop for r in refs], e[1:], strict=True)), want):
                return int(e[0])
        return None

    def count_since(self, cid: str, since: int) -> int:
        h = self.st["history"].get(cid)
        return len(h) - bisect.bisect_left(h, since) if h else 0

    def last_seen(self, cid: str) -> int | None:
        h = self.st["history"].get(cid)
        return h[-1] if h else None

    # --- entering and leaving --------------------------------------------------------------

    def refusal(self, j: g.Journey, ik: str, t: int) -> str | None:
        """Why the user may not enter `j` (as instance `ik`) now, or None."""
        e, st = j.entry, self.st
        if j.status != "active":
            return j.status
        if (e.starts_at is not None and t < e.starts_at) or (e.ends_at is not None and t >= e.ends_at):
            return "outside_schedule"
        if e.audience and not any(self.in_segment(s, t) for s in e.audience):
            return "audience"
        if ik in st["instances"] and not e.restart:
            return "already_in_journey"
        hist = st["entries"].get(j.id)
        if hist is None:
            return None
        if e.once and hist["count"] > 0:
            return "once"
        if e.lock is not None and hist["times"] and t < hist["times"][-1] + e.lock:
            return "locked"
        if e.cap_max is not None:
            n = hist["count"] if e.cap_per is None else sum(1 for x in hist["times"] if x > t - e.cap_per)
            if n >= e.cap_max:
                return "capped"
        return None

    def try_enter(self, j: g.Journey, t: int, trigger: dict[str, Any], event_id: str | None) -> None:
        st = self.st
        ik = j.id
        if j.entry.instance_per is not None:  # one instance per value (this cart, this booking)
            value = get_path(trigger, j.entry.instance_per)
            if value is None or value is MISSING or isinstance(value, (dict, list)):
                self.count(("skipped", j.id, "no_instance_key"))
                return
            ik = f"{j.id}#{value}"
        if j.entry.open and j.status == "active":  # the common case, without the general checks
            reason = None if j.entry.restart or ik not in st["instances"] else "already_in_journey"
        else:
            reason = self.refusal(j, ik, t)
        if reason is not None:
            self.count(("skipped", j.id, reason))
            return
        if ik in st["instances"]:
            self.exit(j, ik, "restarted", t)
        hist = st["entries"].get(j.id)
        keep = j.entry.cap_max or 1  # entry times needed: the last one (lock), or as many as the cap
        if hist is None:
            n = 1
            st["entries"][j.id] = {"count": 1, "times": [t]}
        else:
            n = hist["count"] + 1
            times = hist["times"]
            hist["count"], hist["times"] = n, [*times[max(0, len(times) + 1 - keep) :], t] if keep > 1 else [t]
        st["attribution"].pop(ik, None)
        st["instances"][ik] = {
            "version": j.version,
            "digest": j.digest,
            "entry_no": n,
            "step": j.first,
            "since": t,
            "wake": None,
            "moves": 0,
            "entered": t,
            "trigger": trigger,
            "trigger_event_id": event_id,
            "vars": {},
            "converted": False,
        }
        self.count(("entered", j.id, ""))
        self.run(j, ik, t)
        if st["history"] or st.get("seen"):
            self.replay_later(j, ik, t)

    def replay_later(self, j: g.Journey, ik: str, t: int) -> None:
        """A goal or exit event that happened after the trigger but was processed before it (inputs
        from different topics can arrive out of order): apply it now, at its own time, after the
        steps that were due before it."""
        if not self.st["history"] and not self.st.get("seen"):
            return
        first: tuple[int, int] | None = None
        if j.goal and (last := self.rule_last(j.goal.rule, ik)) is not None and last > t:
            first = (last, 0)
        for r in j.exits:
            if (last := self.rule_last(r, ik)) is not None and last > t and (first is None or (last, 1) < first):
                first = (last, 1)
        if first is None:
            return
        at, kind = first
        st = self.st
        while (inst := st["instances"].get(ik)) is not None and (due := inst["wake"]) is not None and due <= at:
            self.wake(j, ik, due)
        if ik in st["instances"]:
            if kind == 0:
                assert j.goal is not None
                self.convert(j, ik, at)
                if j.goal.exit:
                    self.exit(j, ik, "converted", at)
            else:
                self.exit(j, ik, "exit_event", at)
        elif kind == 0 and ik in st["attribution"] and at <= st["attribution"][ik]["until"]:
            done = st["attribution"].pop(ik)
            self.count(("converted", j.id, "after_exit"))
            if "arm" in done:
                self.count(("experiment", j.id, f"{done['arm']}:converted"))

    def rule_last(self, r: g.Rule, ik: str) -> int | None:
        """The newest time the rule's event happened (for a keyed rule: for this instance's key)."""
        if r.refs:
            inst = self.st["instances"].get(ik)
            return self.last_keyed(r.counter, r.refs, inst) if inst is not None else None
        return self.last_seen(r.counter)

    def convert(self, j: g.Journey, ik: str, t: int) -> None:
        inst = self.st["instances"][ik]
        if inst["converted"]:
            return
        assert j.goal is not None
        if j.goal.within is None or t <= inst["entered"] + j.goal.within:
            inst["converted"] = True
            self.count(("converted", j.id, ""))
            if "arm" in inst:
                self.count(("experiment", j.id, f"{inst['arm']}:converted"))

    def exit(self, j: g.Journey, ik: str, reason: str, t: int) -> None:
        inst = self.st["instances"].pop(ik)
        self.count(("exited", j.id, reason))
        if j.goal and j.goal.within and not inst["converted"] and reason != "restarted":
            until = inst["entered"] + j.goal.within
            if until >= t:
                self.st["attribution"][ik] = {"entry_no": inst["entry_no"], "until": until}
                if "arm" in inst:
                    self.st["attribution"][ik]["arm"] = inst["arm"]
                if j.goal.rule.refs:
                    self.st["attribution"][ik]["key"] = ref_values(j.goal.rule.refs, inst["trigger"], inst["vars"])

    def journey_of(self, ik: str, t: int) -> g.Journey | None:
        """The journey an instance runs, after applying edits; None if the instance had to leave."""
        inst = self.st["instances"][ik]
        j = self.js.journeys.get(journey_id(ik))
        if j is None:
            del self.st["instances"][ik]
            self.count(("exited", journey_id(ik), "journey_removed"))
            return None
        if inst["step"] not in j.steps:  # whatever the version: an edit removed the step
            self.exit(j, ik, "step_removed", t)
            return None
        if inst["version"] != j.version or inst["digest"] != j.digest:
            inst["version"], inst["digest"] = j.version, j.digest
        return j

    # --- timers ----------------------------------------------------------------------------

    def advance(self, until: int) -> None:
        """Run every instance whose wake time is <= until, earliest first, each at its own due time."""
        st = self.st
        instances = st["instances"]
        while instances or "seg_wake" in st:
            first: tuple[int, str] | None = None
            if (w := st.get("seg_wake")) is not None and w <= until:
                first = (w, "")  # before any instance due at the same time: entries see it
            for key, i in instances.items():
                w = i["wake"]
                if w is not None and w <= until and (first is None or (w, key) < first):
                    first = (w, key)
            if first is None:
                return
            wake, ik = first
            if not ik:
                self.segment_edge(wake)
                continue
            j = self.journey_of(ik, wake)
            if j is not None:
                self.wake(j, ik, wake)

    def wake(self, j: g.Journey, ik: str, t: int) -> None:
        """The instance's wake time came: its waiting step ends (elapsed, timed out)."""
        inst = self.st["instances"][ik]
        inst["wake"] = None
        if j.status == "paused":
            inst["wake"] = t + PAUSE_RECHECK_MS
            return
        if j.status == "stopped":
            self.exit(j, ik, "journey_stopped", t)
            return
        node = j.steps[inst["step"]]
        match node:  # the commonest first: each case is an isinstance check
            case g.Wait() | g.WaitUntil() | g.WaitWindow():
                self.move(j, ik, node.next, t)
            case g.WaitFor():
                self.count(("step", j.id, f"{node.id}:timed_out"))
                self.move(j, ik, node.on_timeout, t)
            case g.Call():
                inst.pop("call", None)
                self.count(("step", j.id, f"{node.id}:timed_out"))
                self.move(j, ik, node.on_error, t)
            case g.Send() | g.Branch() | g.Split() | g.Update() | g.End():
                self.run(j, ik, t)  # not a waiting step (e.g. after an edit): carry on from here
            case _:
                assert_never(node)

    def move(self, j: g.Journey, ik: str, target: str, t: int) -> None:
        inst = self.st["instances"][ik]
        if target == g.END:
            self.exit(j, ik, "completed", t)
            return
        _goto(inst, target, t)
        inst.pop("call", None)
        self.run(j, ik, t)

    # --- running steps ---------------------------------------------------------------------
    #
    # Each run_<kind> executes its step at time t and returns the next step id (g.END leaves the
    # journey), or None when the instance stops here: it waits (its wake time is set) or left.

    def run(self, j: g.Journey, ik: str, t: int) -> None:
        """Execute steps from the instance's current step until one waits or the journey ends."""
        instances = self.st["instances"]
        for _ in range(MAX_STEPS_PER_RUN):
            inst = instances[ik]
            node = j.steps[inst["step"]]
            self.count(("visit", j.id, node.id))
            target = self.run_step(j, ik, inst, node, t)
            if target is None:
                return
            if target == g.END:
                self.exit(j, ik, "completed", t)
                return
            _goto(inst, target, t)
        self.exit(j, ik, "loop_guard", t)

    def run_step(self, j: g.Journey, ik: str, inst: Instance, node: g.Node, t: int) -> str | None:
        match node:  # the commonest first: each case is an isinstance check
            case g.Wait():
                inst["wake"] = t + node.ms
                return None
            case g.Send():
                return self.run_send(j, inst, node, t)
            case g.End():
                self.exit(j, ik, "completed", t)
                return None
            case g.WaitUntil():
                return self.run_wait_until(j, ik, inst, node, t)
            case g.WaitWindow():
                return self.run_wait_window(inst, node, t)
            case g.WaitFor():
                return self.run_wait_for(inst, node, t)
            case g.Branch():
                return _branch(node, _Ctx(self, t, inst))
            case g.Split():
                return self.run_split(j, inst, node)
            case g.Update():
                return self.run_update(j, inst, node, t)
            case g.Call():
                return self.run_call(j, inst, node, t)
            case _:
                assert_never(node)

    def run_send(self, j: g.Journey, inst: Instance, node: g.Send, t: int) -> str | None:
        msg: g.Message | None = node.message
        profile = self.st["profile"]
        while msg is not None and not reachable(profile, msg.channel):
            msg = msg.fallback
        if msg is None:
            self.count(("unreachable", j.id, node.id))
            return node.next
        capped = j.category == "marketing" and bool(self.js.caps)
        if capped and (free_at := self.cap_free_at(msg.channel, t)) is not None:
            if j.when_capped == "delay":  # the step runs again when the cap allows it (same key)
                self.count(("step", j.id, f"{node.id}:delayed"))
                inst["wake"] = free_at
                return None
            self.count(("capped", j.id, node.id))
            return node.next
        key = idempotency_key(j.id, self.user, inst["entry_no"], node.id, inst["moves"])
        try:
            req = self.render(j, inst, node.id, msg, key, t)
        except RenderError:  # not sent: a broken or runaway text never reaches a customer
            self.count(("template_error", j.id, node.id))
            return node.next
        self.sink.emit(req)
        self.count(("sent", j.id, msg.channel))
        # `nudgeflow inspect`: why did this user get it
        line = recent_send(t, j.id, node.id, msg.channel, inst["entry_no"], inst["moves"], inst["trigger_event_id"])
        push_recent(self.st, line, RECENT_SENDS)
        if capped:
            self.note_sent(msg.channel, t)
        return node.next

    def cap_free_at(self, channel: str, t: int) -> int | None:
        """None when a marketing send on `channel` at t is within every frequency cap; else the
        earliest time it would be."""
        sent = self.st.get("sent")
        if not sent:
            return None
        free_at = None
        for cap in self.js.caps:
            if cap.channel is not None and cap.channel != channel:
                continue
            times = sorted(s[0] for s in sent if s[0] > t - cap.per_ms and (cap.channel is None or s[1] == cap.channel))
            if len(times) >= cap.max:
                at = times[len(times) - cap.max] + cap.per_ms
                free_at = at if free_at is None else max(free_at, at)
        return free_at

    def note_sent(self, channel: str, t: int) -> None:
        """Remember a marketing send for the caps, as long as the longest cap window needs it."""
        keep = max(c.per_ms for c in self.js.caps)
        sent = [s for s in self.st.get("sent", ()) if s[0] > t - keep]
        sent.append((t, channel))
        self.st["sent"] = sent

    def run_wait_until(self, j: g.Journey, ik: str, inst: Instance, node: g.WaitUntil, t: int) -> str | None:
        if node.at is not None:
            at: int | None = node.at
        else:
            assert node.attribute is not None
            base = iso_to_ms(self.st["profile"].get(node.attribute))
            at = None if base is None else base + node.offset
        if at is None:
            if node.if_missing == "end":
                self.exit(j, ik, "attribute_missing", t)
                return None
            return node.next
        if at > t:
            inst["wake"] = at
            return None
        return node.next

    def run_wait_window(self, inst: Instance, node: g.WaitWindow, t: int) -> str | None:
        at = _next_window(node, t, self.st["profile"])
        if at > t:
            inst["wake"] = at
            return None
        return node.next

    def run_wait_for(self, inst: Instance, node: g.WaitFor, t: int) -> str | None:
        seen = self.last_keyed(node.counter, node.refs, inst) if node.refs else self.last_seen(node.counter)
        if seen is not None and seen > inst["since"]:
            return node.next  # it already happened (processed before this step began)
        inst["wake"] = t + node.timeout
        return None

    def run_split(self, j: g.Journey, inst: Instance, node: g.Split) -> str:
        seed = f"{j.id}|{self.user}|{inst['entry_no']}|{node.id}".encode()
        digest = hashlib.sha1(seed, usedforsecurity=False).hexdigest()
        bucket = int(digest[:8], 16) % 100
        target = next(nxt for upper, nxt in node.arms if bucket < upper)
        arm = f"{node.id}:{'control' if target == g.END else target}"
        inst["arm"] = arm
        self.count(("experiment", j.id, f"{arm}:entered"))
        if target == g.END:
            self.count(("step", j.id, f"{node.id}:control"))
        return target

    def run_update(self, j: g.Journey, inst: Instance, node: g.Update, t: int) -> str:
        self.touch_segments(t)
        profile, changes = self.st["profile"], dict[str, Any]()
        try:
            rendered = render_value(node.set, {**self.context(j, inst), "now": t})
        except RenderError:  # no attribute of this update is set: half an update is worse than none
            self.count(("template_error", j.id, node.id))
            return node.next
        for k, v in rendered.items():
            changes[k] = profile[k] = v
        for k, by in node.increment.items():
            cur = profile.get(k, 0)
            base = cur if isinstance(cur, (int, float)) and not isinstance(cur, bool) else 0
            total = base + by
            changes[k] = profile[k] = int(total) if float(total).is_integer() else total
        for k in node.unset:
            profile.pop(k, None)
            changes[k] = None
        self.sink.emit(ProfileChanged(self.user, changes, t))
        return node.next

    def run_call(self, j: g.Journey, inst: Instance, node: g.Call, t: int) -> str | None:
        ctx = self.context(j, inst)
        key = idempotency_key(j.id, self.user, inst["entry_no"], node.id, inst["moves"])
        try:
            req = CallRequest(
                key=key,
                user_id=self.user,
                journey=j.id,
                step=node.id,
                method=node.method,
                url=node.url.render(ctx),
                headers=render_value(node.headers, ctx),
                body=render_value(node.body, ctx),
                timeout_ms=node.timeout,
                created_at=t,
            )
        except RenderError:  # the call is not made: the step fails at once
            self.count(("template_error", j.id, node.id))
            self.count(("step", j.id, f"{node.id}:error"))
            return node.on_error
        inst["call"] = key
        inst["wake"] = max(t, self.wall or t) + node.timeout  # the answer arrives in processing time
        self.sink.emit(req)
        return None

    def context(self, j: g.Journey, inst: Instance) -> dict[str, Any]:
        return {
            "trigger": inst["trigger"],
            "event": self.event_props if self.event_props is not None else inst["trigger"],
            "profile": self.st["profile"],
            "vars": inst["vars"],
            "user": {"id": self.user},
            "journey": {"id": j.id, "name": j.name, "version": j.version},
        }

    def render(self, j: g.Journey, inst: Instance, step: str, msg: g.Message, key: str, t: int) -> SendRequest:
        ctx = self.context(j, inst)
        fallback = None
        if msg.fallback is not None:
            fallback = self.render(j, inst, step, msg.fallback, key + ":" + msg.fallback.channel, t)
        return SendRequest(
            key=key,
            channel=msg.channel,
            user_id=self.user,
            journey=j.id,
            journey_version=j.version,
            step=step,
            instance=inst["entry_no"],
            template=msg.template,
            content={k: v.render(ctx) for k, v in msg.content.items()},
            data=render_value(msg.data, ctx),
            created_at=t,
            trigger_event_id=inst["trigger_event_id"],
            fallback=fallback,
            to=msg.to.render(ctx) if msg.to is not None else _recipient(self.st["profile"], msg.channel),
            expires_at=t + msg.expires_ms,
        )


RECIPIENT_ATTRIBUTE = {
    "email": "email",
    "sms": "phone",
    "whatsapp": "phone",
    "push": "push_token",
    "webpush": "webpush_subscription",
}


def _branch(node: g.Branch, ctx: _Ctx) -> str:
    """The step a branch goes to: its first case whose condition holds, else `otherwise` (a loop,
    not a generator: a compiled `_Run` method may hold no closure)."""
    for cond, nxt in node.cases:
        if cond(ctx):
            return nxt
    return node.otherwise


def _recipient(profile: Mapping[str, Any], channel: str) -> str | None:
    """The channel's address from the profile (text; a web push subscription object as JSON)."""
    attr = RECIPIENT_ATTRIBUTE.get(channel)
    v = profile.get(attr) if attr else None
    if v is None or v == "":
        return None
    if isinstance(v, str):
        return v
    return json.dumps(v, sort_keys=True, separators=(",", ":"))


def journey_id(ik: str) -> str:
    """The journey of an instance key: `<journey>` or, per correlation value, `<journey>#<value>`."""
    return ik.split("#", 1)[0] if "#" in ik else ik


def _keyed(refs: tuple[Ref, ...], props: Mapping[str, Any], inst: Instance) -> bool:
    """The event is about the instance's item (no references: any event is)."""
    return not refs or refs_match(refs, props, ref_values(refs, inst["trigger"], inst["vars"]))


def _goto(inst: Instance, step: str, t: int) -> None:
    inst["step"], inst["since"], inst["wake"], inst["moves"] = step, t, None, inst["moves"] + 1


class _Ctx:
    """What conditions see: profile, histories, segments, the instance's trigger and vars."""

    __slots__ = ("inst", "now", "profile", "run", "trigger", "vars")

    def __init__(self, run: _Run, now: int, inst: Instance | None) -> None:
        self.run, self.now, self.inst = run, now, inst
        self.profile: Mapping[str, Any] = run.st["profile"]
        self.trigger: Mapping[str, Any] = inst["trigger"] if inst else {}
        self.vars: Mapping[str, Any] = inst["vars"] if inst else {}

    def count(self, counter: str, since: int) -> int:
        return self.run.count_since(counter, since)

    def in_segment(self, name: str) -> bool:
        return self.run.in_segment(name, self.now, self.inst)


def _next_window(node: g.WaitWindow, t: int, profile: Mapping[str, Any]) -> int:
    """The first moment >= t inside the allowed days and hours, in the user's or a fixed zone."""
    tzname = node.timezone
    if tzname.startswith("attribute:"):
        tzname = str(profile.get(tzname.split(":", 1)[1]) or "UTC")
    try:
        tz: dt.tzinfo = zoneinfo.ZoneInfo(tzname)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        tz = dt.UTC
    local = dt.datetime.fromtimestamp(t / 1000, tz)
    for d in range(8):
        day = (local + dt.timedelta(days=d)).date()
        if day.weekday() not in node.days:
            continue
        midnight = dt.datetime(day.year, day.month, day.day, tzinfo=tz)
        start = midnight + dt.timedelta(minutes=node.start_min)
        end = midnight + dt.timedelta(minutes=node.end_min)
        if start <= local < end:
            return t
        if local < start:
            return int(start.timestamp() * 1000)
    return t  # no allowed day at all cannot happen (days is non-empty); do not block forever
