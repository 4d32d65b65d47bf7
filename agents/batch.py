"""One batch of input messages -> state writes, changelog records and output records.

Faust-free on purpose: the journey agent feeds it Faust events, the benchmark feeds it raw
confluent-kafka messages, the tests feed it lists. Per batch, each user's state is read once
(multi-get), every input is applied through the engine in order, and each touched user is
written once. A per-user record of the last input offset per topic makes replays (after a crash
between producing and committing) no-ops: no duplicate sends, no double counting.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import orjson

from nudgeflow.agents.keys import timer_key, user_key
from nudgeflow.engine import core
from nudgeflow.engine.graph import JourneySet
from nudgeflow.engine.io import (
    CallRequest,
    CallResult,
    Count,
    Enroll,
    Event,
    Feedback,
    Input,
    ProfileChanged,
    ProfileUpdate,
    SendRequest,
    Tick,
    TimerCleared,
    TimerSet,
)
from nudgeflow.streams.events import Decoder, Invalid
from nudgeflow.streams.topics import Topics


@dataclass(frozen=True, slots=True)
class Message:
    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    timestamp: int | None  # Kafka message timestamp, ms


Item = tuple[Message, Input, int]  # a decoded input and the time it applies at


@dataclass(slots=True)
class Record:
    topic: str
    key: bytes | None
    value: bytes
    headers: list[tuple[str, bytes]] | None = None
    partition: int | None = None


@dataclass
class BatchOutput:
    """What a batch produced. `writes[p]` is the ordered list of table writes of partition p
    (timer puts, then states, then timer deletes); it is both the RocksDB WriteBatch and the
    changelog records, in that order."""

    writes: dict[int, list[tuple[bytes, bytes | None]]] = field(default_factory=dict)
    records: list[Record] = field(default_factory=list)
    counts: list[Count] = field(default_factory=list)
    invalid: list[tuple[str, str]] = field(default_factory=list)  # (topic, reason)
    consumed: dict[str, int] = field(default_factory=dict)  # topic -> messages
    timers_set: dict[int, int] = field(default_factory=dict)  # partition -> +n
    timers_cleared: dict[int, int] = field(default_factory=dict)
    timers_cancelled: int = 0  # cleared by an event before they were due (e.g. a purchase)
    earliest_timer: dict[int, int] = field(default_factory=dict)  # partition -> min due set
    ticks: list[tuple[int, int, bool]] = field(default_factory=list)  # (partition, due, stale) processed
    duplicates: int = 0
    sends: dict[str, int] = field(default_factory=dict)  # channel -> n
    last_offset: dict[tuple[str, int], int] = field(default_factory=dict)  # (topic, p) -> applied offset
    max_ts: dict[tuple[str, int], int] = field(default_factory=dict)  # (topic, p) -> newest applied time


class StateReader(Protocol):
    def get_many(self, partition: int, keys: list[bytes]) -> list[bytes | None]: ...


class BatchCore:
    def __init__(
        self, journeys: JourneySet, topics: Topics, decoder: Decoder, clock: Callable[[], float] = time.time
    ) -> None:
        self.journeys, self.topics, self.decoder, self.clock = journeys, topics, decoder, clock
        self.ticks_topic = topics.ticks

    def run(self, msgs: Sequence[Message], store: StateReader) -> BatchOutput:
        """Decode and apply in message order (no cross-topic alignment)."""
        out = BatchOutput()
        self.apply(self.decode(msgs, out), store, out)
        return out

    def decode(self, msgs: Sequence[Message], out: BatchOutput) -> list[Item]:
        """Messages -> inputs with their time. Invalid ones go to the dead-letter records now;
        events no journey or history uses are dropped here (no state read, no write)."""
        now_ms = int(self.clock() * 1000)
        items: list[Item] = []
        watched = self.journeys.watched
        for m in msgs:
            out.consumed[m.topic] = out.consumed.get(m.topic, 0) + 1
            inp, at = self._decode(m, now_ms, out)
            if inp is None or (isinstance(inp, Event) and inp.name not in watched):
                continue
            items.append((m, inp, at))
        return items

    def apply(self, decoded: Sequence[Item], store: StateReader, out: BatchOutput) -> None:
        """Run the engine over inputs in the given order; each user's state read and written once."""
        wanted: dict[int, set[str]] = {}
        for m, inp, at in decoded:
            wanted.setdefault(m.partition, set()).add(inp.user_id)
            tp = (m.topic, m.partition)
            out.last_offset[tp] = max(out.last_offset.get(tp, -1), m.offset)
            if not isinstance(inp, Tick):
                out.max_ts[tp] = max(out.max_ts.get(tp, at), at)
        cache: dict[tuple[int, str], dict[str, Any] | None] = {}
        for p, users in wanted.items():
            ulist = sorted(users)
            for u, raw in zip(ulist, store.get_many(p, [user_key(u) for u in ulist]), strict=True):
                cache[(p, u)] = orjson.loads(raw) if raw is not None else None
        dirty: set[tuple[int, str]] = set()
        timer_ops: dict[int, dict[tuple[int, str], bool]] = {}
        for m, inp, at in decoded:
            ck = (m.partition, inp.user_id)
            rec = cache[ck]
            if m.offset >= 0 and rec is not None and rec["o"].get(m.topic, -1) >= m.offset:
                out.duplicates += 1  # already applied before a crash or rebalance
                continue
            if isinstance(inp, Tick):  # stale: the user's wake-up moved or already ran (a duplicate tick)
                out.ticks.append((m.partition, at, core.next_wake(rec["s"] if rec else None) != at))
            res = core.process(rec["s"] if rec else None, inp, at, self.journeys)
            if not res.changed:
                continue
            if rec is None:
                rec = cache[ck] = {"s": res.state, "o": {}}
            rec["s"] = res.state
            if m.offset >= 0:  # in-process ticks have none: they are idempotent by themselves
                rec["o"][m.topic] = m.offset
            dirty.add(ck)
            self._effects(res.effects, m.partition, out, timer_ops, cancels=not isinstance(inp, Tick))
        for p, ops in timer_ops.items():
            w = out.writes.setdefault(p, [])
            w.extend((timer_key(d, u), b"1") for (d, u), put in sorted(ops.items()) if put)
        for p, u in sorted(dirty):
            out.writes.setdefault(p, []).append((user_key(u), orjson.dumps(cache[(p, u)])))
        for p, ops in timer_ops.items():
            out.writes[p].extend((timer_key(d, u), None) for (d, u), put in sorted(ops.items()) if not put)

    def _decode(self, m: Message, now_ms: int, out: BatchOutput) -> tuple[Input | None, int]:
        if m.topic == self.ticks_topic:
            try:
                doc = orjson.loads(m.value or b"")
                return Tick(str(doc["user_id"])), int(doc["due"])
            except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
                self._dead(m, Invalid("bad_message", "tick needs user_id and due"), out)
                return None, 0
        inp = self.decoder.decode(m.topic, m.value, m.timestamp, now_ms)
        if isinstance(inp, Invalid):
            self._dead(m, inp, out)
            return None, 0
        if isinstance(inp, (Event, ProfileUpdate, Enroll)):
            return inp, inp.ts
        if isinstance(inp, (Feedback, CallResult)):
            return inp, m.timestamp or now_ms
        return inp, now_ms

    def _dead(self, m: Message, bad: Invalid, out: BatchOutput) -> None:
        out.invalid.append((m.topic, bad.reason))
        out.records.append(
            Record(
                self.topics.dead_letter,
                m.key,
                m.value or b"",
                [
                    ("reason", bad.reason.encode()),
                    ("detail", bad.detail.encode()),
                    ("source_topic", m.topic.encode()),
                    ("source_partition", str(m.partition).encode()),
                    ("source_offset", str(m.offset).encode()),
                ],
            )
        )

    def _effects(
        self,
        effects: Iterable[Any],
        p: int,
        out: BatchOutput,
        timer_ops: dict[int, dict[tuple[int, str], bool]],
        cancels: bool,
    ) -> None:
        for fx in effects:
            if isinstance(fx, Count):
                out.counts.append(fx)
            elif isinstance(fx, SendRequest):
                out.records.append(
                    Record(
                        self.topics.channel(fx.channel),
                        fx.user_id.encode(),
                        orjson.dumps(fx.to_dict()),
                        [("idempotency_key", fx.key.encode())],
                    )
                )
                out.sends[fx.channel] = out.sends.get(fx.channel, 0) + 1
            elif isinstance(fx, TimerSet):
                timer_ops.setdefault(p, {})[(fx.due, fx.user_id)] = True
                out.timers_set[p] = out.timers_set.get(p, 0) + 1
                out.earliest_timer[p] = min(out.earliest_timer.get(p, fx.due), fx.due)
            elif isinstance(fx, TimerCleared):
                ops = timer_ops.setdefault(p, {})
                if ops.get((fx.due, fx.user_id)) is True:
                    del ops[(fx.due, fx.user_id)]  # set and cleared within this batch
                else:
                    ops[(fx.due, fx.user_id)] = False
                out.timers_cleared[p] = out.timers_cleared.get(p, 0) + 1
                out.timers_cancelled += cancels
            elif isinstance(fx, ProfileChanged):
                out.records.append(
                    Record(
                        self.topics.profile_changes,
                        fx.user_id.encode(),
                        orjson.dumps({"user_id": fx.user_id, "ts": fx.ts, "attributes": fx.attributes}),
                    )
                )
            elif isinstance(fx, CallRequest):
                out.records.append(
                    Record(
                        self.topics.calls,
                        fx.user_id.encode(),
                        orjson.dumps(
                            {
                                "key": fx.key,
                                "user_id": fx.user_id,
                                "journey": fx.journey,
                                "step": fx.step,
                                "method": fx.method,
                                "url": fx.url,
                                "headers": fx.headers,
                                "body": fx.body,
                                "timeout_ms": fx.timeout_ms,
                                "created_at": fx.created_at,
                            }
                        ),
                    )
                )
