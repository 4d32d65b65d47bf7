"""A virtual-clock runner over many users: the marketer's dry run and the worker's reference.

Inputs are applied in time order; before each one, every user's timer due at or before its time
fires (earliest first), exactly as the worker's timer scanner would. The result is the list of
effects with the time they happened, so tests can assert exact sends, times and exits.
"""

from __future__ import annotations

import heapq
from collections import Counter as Tally
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from nudgeflow.engine.core import next_wake, process
from nudgeflow.engine.graph import JourneySet
from nudgeflow.engine.io import (
    CallRequest,
    CallResult,
    Count,
    Effect,
    Enroll,
    Event,
    Input,
    MemberCheck,
    ProfileUpdate,
    SendRequest,
    Tick,
    TimerSet,
)
from nudgeflow.engine.state import UserState


def input_time(inp: Input) -> int:
    if isinstance(inp, (Event, ProfileUpdate, Enroll)):
        return inp.ts
    raise ValueError(f"{type(inp).__name__} has no time of its own; pass it with feed(inp, at)")


@dataclass
class Simulator:
    journeys: JourneySet
    states: dict[str, UserState] = field(default_factory=dict)
    log: list[tuple[int, Effect]] = field(default_factory=list)
    clock: int = 0
    # answers to `call` steps (simulate --calls); None: the call is not made and the step times
    # out, which `unanswered` counts per (journey, step) so reports can say so
    answer: Callable[[CallRequest], CallResult | None] | None = None
    unanswered: Tally[tuple[str, str]] = field(default_factory=Tally)
    # every effect as (time, user, effect), as it happens (streaming reports); `keep_log=False`
    # keeps `log` empty, so memory does not grow with the input (nudgeflow simulate)
    listener: Callable[[int, str, Effect], None] | None = None
    keep_log: bool = True
    _timers: list[tuple[int, str]] = field(default_factory=list)
    # (starts_at, journey) of include_current_members journeys: every user known then is checked
    _activations: list[tuple[int, str]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._activations = sorted(
            (j.entry.starts_at, j.id)
            for j in self.journeys.journeys.values()
            if j.entry.include_current_members and j.entry.starts_at is not None and j.status == "active"
        )

    def feed(self, inp: Input, at: int | None = None) -> list[Effect]:
        """Apply one input at `at` (default: its own time) after firing every timer due by then."""
        t = input_time(inp) if at is None else at
        self.run_until(t)
        return self._apply(inp, t)

    def feed_all(self, inputs: Iterable[Input]) -> None:
        for inp in sorted(inputs, key=input_time):
            self.feed(inp)

    def run_until(self, t: int) -> None:
        """Fire every timer due at or before t (and admit current members at an activation)."""
        while self._activations and self._activations[0][0] <= t:
            at, jid = self._activations.pop(0)
            self._fire(at)
            for user in sorted(self.states):  # what the worker's scan of its users does
                self._apply(MemberCheck(user, jid), at)
        self._fire(t)
        self.clock = max(self.clock, t)

    def _fire(self, t: int) -> None:
        while self._timers and self._timers[0][0] <= t:
            due, user = heapq.heappop(self._timers)
            if next_wake(self.states.get(user)) != due:
                continue  # stale: the user's wake-up moved since this was scheduled
            self._apply(Tick(user), due)

    def _apply(self, inp: Input, t: int) -> list[Effect]:
        res = process(self.states.get(inp.user_id), inp, t, self.journeys)
        if res.changed:
            self.states[inp.user_id] = res.state
        answers = []
        listener, user = self.listener, inp.user_id
        for fx in res.effects:
            if self.keep_log:
                self.log.append((t, fx))
            if listener is not None:
                listener(t, user, fx)
            if isinstance(fx, TimerSet):
                heapq.heappush(self._timers, (fx.due, fx.user_id))
            elif isinstance(fx, CallRequest):
                result = self.answer(fx) if self.answer is not None else None
                if result is None:
                    self.unanswered[(fx.journey, fx.step)] += 1
                else:
                    answers.append(result)
        effects = list(res.effects)
        for result in answers:  # answered at once, at the same time
            effects += self._apply(result, t)
        return effects

    # --- views for tests and reports ------------------------------------------------------

    @property
    def sends(self) -> list[SendRequest]:
        return [fx for _, fx in self.log if isinstance(fx, SendRequest)]

    def counts(self, kind: str, journey: str | None = None) -> list[Count]:
        return [
            fx
            for _, fx in self.log
            if isinstance(fx, Count) and fx.kind == kind and (journey is None or fx.journey == journey)
        ]

    def pending(self) -> int:
        return sum(1 for s in self.states.values() if next_wake(s) is not None)
