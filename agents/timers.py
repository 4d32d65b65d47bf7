"""The durable per-user timer: an ordered scan of the timer index, turned into tick messages.

The index (`t:<due><user>` keys, see agents.keys) lives in the journey state table, so it moves
with its partition and is restored from the changelog with the state. Every interval the scanner
walks each active partition from its cursor up to now - grace, oldest first, and produces one
tick per due entry to the ticks topic, on the same partition. The journey agent processes ticks
like events, serialised with that user's other inputs; a tick with nothing due is a no-op, so a
tick sent twice (after a crash, before the index entry was deleted) cannot send twice.

Bounded: at most `fire_limit` ticks per partition per scan and `inflight_limit` unprocessed ticks
per partition, so a backlog of overdue timers (after downtime) drains steadily without starving
event processing. The cursor avoids re-reading deleted (fired) keys, which is what makes
seeking cheap after many timers fired.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import orjson

from agents import metrics
from agents.keys import TIMER, parse_timer_key, timer_key
from agents.output import Output


def event_time_gate(inputs: list[tuple[bool, int | None]]) -> float:
    """The latest due time that may fire on a partition, from its input topic-partitions.

    Each input is (lagging, newest event time applied). While an input lags (offsets left to
    read, or inputs held for alignment), a timer may fire only once that input's event time has
    passed it: otherwise, catching up after downtime, a push would go out before the purchase
    made during the downtime is read. Inputs that are caught up do not hold timers back.
    """
    gate = float("inf")
    for lagging, newest in inputs:
        if lagging:
            gate = min(gate, float(newest) if newest is not None else float("-inf"))
    return gate


class TimerScanner:
    def __init__(
        self,
        output: Output,
        ticks_topic: str,
        db_for: Callable[[int], Any],
        grace_ms: int,
        fire_limit: int,
        inflight_limit: int,
    ) -> None:
        self.output, self.ticks_topic, self.db_for = output, ticks_topic, db_for
        self.grace_ms, self.fire_limit, self.inflight_limit = grace_ms, fire_limit, inflight_limit
        self.cursor: dict[int, bytes] = {}
        self.inflight: dict[int, int] = {}
        self.pending: dict[int, int] = {}

    @property
    def partitions(self) -> list[int]:
        return sorted(self.cursor)

    def assign(self, partitions: set[int]) -> None:
        for p in sorted(partitions):
            self.cursor[p] = TIMER
            self.inflight[p] = 0
            self.pending[p] = self._count(p)
            metrics.PENDING_TIMERS.labels(str(p)).set(self.pending[p])

    def revoke(self, partitions: set[int]) -> None:
        for p in partitions:
            self.cursor.pop(p, None)
            self.inflight.pop(p, None)
            self.pending.pop(p, None)
            metrics.PENDING_TIMERS.remove(str(p)) if str(p) in _label_values() else None

    def _count(self, p: int) -> int:
        it = self.db_for(p).iter()
        it.seek(TIMER)
        n = 0
        while it.valid() and it.key().startswith(TIMER):
            n += 1
            it.next()
        return n

    def rewind(self, p: int, due: int) -> None:
        """A timer was set earlier than the cursor (a late event): scan from there again."""
        if p in self.cursor:
            key = timer_key(due, "")
            if key < self.cursor[p]:
                self.cursor[p] = key

    def applied(self, p: int, set_n: int, cleared_n: int) -> None:
        if p in self.pending:
            self.pending[p] += set_n - cleared_n
            metrics.PENDING_TIMERS.labels(str(p)).set(self.pending[p])

    def tick_done(self, p: int) -> None:
        if self.inflight.get(p, 0) > 0:
            self.inflight[p] -= 1

    def scan(self, now_ms: int, gate: Callable[[int], float] | None = None) -> int:
        """Produce ticks for every due timer (bounded); return how many. `gate(p)` caps the due
        times that may fire on partition p (see event_time_gate)."""
        fired = 0
        for p in self.partitions:
            room = min(self.fire_limit, self.inflight_limit - self.inflight[p])
            if room <= 0:
                continue
            limit_due = min(now_ms - self.grace_ms, gate(p) if gate else float("inf"))
            it = self.db_for(p).iter()
            it.seek(self.cursor[p])
            n = 0
            while n < room and it.valid():
                key = it.key()
                if not key.startswith(TIMER):
                    break
                due, user = parse_timer_key(key)
                if due > limit_due:
                    break
                self.output.produce(
                    self.ticks_topic, orjson.dumps({"user_id": user, "due": due}), key=user.encode(), partition=p
                )
                self.cursor[p] = key + b"\x00"  # the next possible key after this one
                n += 1
                it.next()
            self.inflight[p] += n
            fired += n
        if fired:
            self.output.poll()
            metrics.TICKS_EMITTED.inc(fired)
        return fired


def _label_values() -> set[str]:
    return {s.labels["partition"] for m in metrics.PENDING_TIMERS.collect() for s in m.samples}
