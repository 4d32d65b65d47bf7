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
from typing import Any, NotRequired, Protocol, TypedDict, assert_never, cast

import orjson

from nudgeflow.agents.keys import timer_key, user_key
from nudgeflow.engine import core
from nudgeflow.engine.graph import JourneySet
from nudgeflow.engine.io import (
    CallRequest,
    CallResult,
    Count,
    Effect,
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
from nudgeflow.engine.state import UserState
from nudgeflow.streams import wire
from nudgeflow.streams.events import Decoder, Invalid, Release
from nudgeflow.streams.topics import Topics


@dataclass(frozen=True, slots=True)
class Message:
    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    timestamp: int | None  # Kafka message timestamp, ms
    headers: Sequence[tuple[str, bytes]] | None = None  # the producer's headers, kept in dead letters


@dataclass(frozen=True, slots=True)
class Item:
    """A decoded input and the time it applies at."""

    msg: Message
    input: Input | Release
    at: int


class ParkedInput(TypedDict):
    """An input of a quarantined user, kept as it arrived, to apply when the user is released."""

    topic: str
    partition: int
    offset: int
    value: str  # the message value (valid UTF-8 JSON: it passed validation)
    kafka_ts: int | None


class Quarantine(TypedDict):
    """Why and since when a user is set aside: applying an input raised. The state is kept as it
    was before that input, timers are held, later inputs are parked (bounded) until release."""

    since: int  # processing time, epoch ms
    error: str  # the exception's type name (never its text: it may quote user data)
    topic: str
    offset: int
    parked: list[ParkedInput]


class UserRecord(TypedDict):
    """The stored value of `u:<user>`: the engine state and, per input topic, the offset of the
    last input applied to it (a replayed input at or below it is a duplicate)."""

    state: UserState
    offsets: dict[str, int]
    quarantine: NotRequired[Quarantine]


def upgrade_record(doc: Any) -> UserRecord:
    """A stored record in the current shape. nudgeflow 0.1.0 stored short keys (`s`, `o`, `inst`,
    `n`, `k`, `tid`, ...): they are renamed on read, and written back in the new shape."""
    if "s" not in doc:
        return cast(UserRecord, doc)
    s = doc["s"]
    instances = {
        jid: {
            "version": i["v"],
            "digest": "",
            "entry_no": i["n"],
            "step": i["step"],
            "since": i["since"],
            "wake": i["wake"],
            "moves": i["k"],
            "entered": i["entered"],
            "trigger": i["trigger"],
            "trigger_event_id": i["tid"],
            "vars": i["vars"],
            "converted": i["converted"],
            **({"call": i["call"]} if "call" in i else {}),
        }
        for jid, i in s["inst"].items()
    }
    state = {
        "clock": s["clock"],
        "instances": instances,
        "attribution": {jid: {"entry_no": d["n"], "until": d["until"]} for jid, d in s["done"].items()},
        "entries": {jid: {"count": e["n"], "times": e["ts"]} for jid, e in s["entries"].items()},
        "profile": s["profile"],
        "history": s["hist"],
    }
    return cast(UserRecord, {"state": state, "offsets": doc["o"]})


MAX_PARKED = 1000  # inputs kept per quarantined user; later ones go to the dead-letter topic


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
    max_ts: dict[tuple[str, int], int] = field(default_factory=dict)  # (topic, p) -> newest applied time
    quarantined: list[tuple[str, str]] = field(default_factory=list)  # (user, error type) set aside now
    released: int = 0
    parked: int = 0
    parked_overflow: int = 0


class StateReader(Protocol):
    def get_many(self, partition: int, keys: list[bytes]) -> list[bytes | None]: ...


class BatchCore:
    def __init__(
        self,
        journeys: JourneySet,
        topics: Topics,
        decoder: Decoder,
        clock: Callable[[], float] = time.time,
        release_quarantined: bool = False,
        keyless: str = "accept",
        dead_letter_max_bytes: int = 512 * 1024,
    ) -> None:
        self.journeys, self.topics, self.decoder, self.clock = journeys, topics, decoder, clock
        self.ticks_topic = topics.ticks
        self.release_all = release_quarantined  # Settings.release_quarantined
        self.keyless = keyless  # Settings.keyless: "accept" or "dead_letter"
        self.dead_letter_max_bytes = dead_letter_max_bytes

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
            items.append(Item(m, inp, at))
        return items

    def apply(self, decoded: Sequence[Item], store: StateReader, out: BatchOutput) -> None:
        """Run the engine over inputs in the given order; each user's state read and written once."""
        wanted: dict[int, set[str]] = {}
        for item in decoded:
            m, inp, at = item.msg, item.input, item.at
            wanted.setdefault(m.partition, set()).add(inp.user_id)
            if not isinstance(inp, Tick):
                tp = (m.topic, m.partition)
                out.max_ts[tp] = max(out.max_ts.get(tp, at), at)
        cache: dict[tuple[int, str], UserRecord | None] = {}
        for p, users in wanted.items():
            ulist = sorted(users)
            for u, raw in zip(ulist, store.get_many(p, [user_key(u) for u in ulist]), strict=True):
                cache[(p, u)] = upgrade_record(orjson.loads(raw)) if raw is not None else None
        dirty: set[tuple[int, str]] = set()
        timer_ops: dict[int, dict[tuple[int, str], bool]] = {}
        now_ms = int(self.clock() * 1000)
        for item in decoded:
            m, inp = item.msg, item.input
            ck = (m.partition, inp.user_id)
            rec = cache[ck]
            if m.offset >= 0 and rec is not None and rec["offsets"].get(m.topic, -1) >= m.offset:
                out.duplicates += 1  # already applied before a crash or rebalance
                continue
            if rec is not None and "quarantine" in rec:
                if not (isinstance(inp, Release) or self.release_all):
                    if self._park(rec, m, out):
                        dirty.add(ck)
                    continue
                rec = cache[ck] = self._release(rec, inp.user_id, now_ms, out, timer_ops)
                dirty.add(ck)
            if isinstance(inp, Release):
                if rec is not None and "quarantine" not in rec:  # released: run what fell due meanwhile
                    tick = Message(self.ticks_topic, m.partition, -1, m.key, None, None)
                    rec = cache[ck] = (
                        self._apply_one(rec, tick, Tick(inp.user_id), item.at, now_ms, out, timer_ops) or rec
                    )
                    if m.offset >= 0:
                        rec["offsets"][m.topic] = m.offset
                    dirty.add(ck)
                continue
            new = self._apply_one(rec, m, inp, item.at, now_ms, out, timer_ops)
            if new is not None:
                cache[ck] = new
                dirty.add(ck)
        for p, ops in timer_ops.items():
            w = out.writes.setdefault(p, [])
            w.extend((timer_key(d, u), b"1") for (d, u), put in sorted(ops.items()) if put)
        for p, u in sorted(dirty):
            out.writes.setdefault(p, []).append((user_key(u), orjson.dumps(cache[(p, u)])))
        for p, ops in timer_ops.items():
            out.writes[p].extend((timer_key(d, u), None) for (d, u), put in sorted(ops.items()) if not put)

    def _apply_one(
        self,
        rec: UserRecord | None,
        m: Message,
        inp: Input,
        at: int,
        now_ms: int,
        out: BatchOutput,
        timer_ops: dict[int, dict[tuple[int, str], bool]],
    ) -> UserRecord | None:
        """Apply one input to one user's record; the new record, or None when nothing changed.
        An exception quarantines this user alone: everyone else in the batch goes on."""
        if isinstance(inp, Tick):  # stale: the user's wake-up moved or already ran (a duplicate tick)
            out.ticks.append((m.partition, at, core.next_wake(rec["state"] if rec else None) != at))
        try:
            res = core.process(rec["state"] if rec else None, inp, at, self.journeys)
        except Exception as e:  # a bug or an edit the engine cannot follow: never the whole batch
            return self._quarantine(rec, m, inp.user_id, type(e).__name__, now_ms, out)
        if not res.changed:
            return None
        if rec is None:
            rec = {"state": res.state, "offsets": {}}
        rec["state"] = res.state
        if m.offset >= 0:  # in-process ticks have none: they are idempotent by themselves
            rec["offsets"][m.topic] = m.offset
        self._effects(res.effects, m.partition, out, timer_ops, cancels=not isinstance(inp, Tick))
        return rec

    def _quarantine(
        self, rec: UserRecord | None, m: Message, user: str, error: str, now_ms: int, out: BatchOutput
    ) -> UserRecord:
        rec = rec if rec is not None else {"state": core.new_state(), "offsets": {}}
        rec["quarantine"] = {"since": now_ms, "error": error, "topic": m.topic, "offset": m.offset, "parked": []}
        out.quarantined.append((user, error))
        self._park(rec, m, out)
        return rec

    def _park(self, rec: UserRecord, m: Message, out: BatchOutput) -> bool:
        """Keep a quarantined user's input for release; False when there was nothing to keep."""
        if m.offset < 0 or m.value is None:  # a timer: held as it is in the index
            return False
        q = rec["quarantine"]
        if len(q["parked"]) >= MAX_PARKED:
            self._dead(m, Invalid("quarantine_overflow", f"user quarantined with {MAX_PARKED} inputs parked"), out)
            out.parked_overflow += 1
        else:
            value = m.value.decode("utf-8", "replace")
            q["parked"].append(
                {
                    "topic": m.topic,
                    "partition": m.partition,
                    "offset": m.offset,
                    "value": value,
                    "kafka_ts": m.timestamp,
                }
            )
            out.parked += 1
        rec["offsets"][m.topic] = m.offset
        return True

    def _release(
        self,
        rec: UserRecord,
        user: str,
        now_ms: int,
        out: BatchOutput,
        timer_ops: dict[int, dict[tuple[int, str], bool]],
    ) -> UserRecord:
        """Lift a user's quarantine and apply the parked inputs in order (one may quarantine the
        user again: the rest stay parked)."""
        parked = rec.pop("quarantine")["parked"]
        out.released += 1
        key = user.encode()
        for i, pi in enumerate(parked):
            msg = Message(pi["topic"], pi["partition"], -1, key, pi["value"].encode(), pi["kafka_ts"])
            inp, at = self._decode(msg, now_ms, out)
            if inp is None or isinstance(inp, Release):
                continue
            new = self._apply_one(rec, msg, inp, at, now_ms, out, timer_ops)
            rec = new if new is not None else rec
            if "quarantine" in rec:
                rec["quarantine"]["parked"].extend(parked[i:])  # the one that raised comes first again
                break
        return rec

    def _decode(self, m: Message, now_ms: int, out: BatchOutput) -> tuple[Input | Release | None, int]:
        if m.topic == self.ticks_topic:
            try:
                user, due = wire.decode_tick(m.value)
            except wire.WireError as e:
                self._dead(m, Invalid("bad_message", str(e)), out)
                return None, 0
            return Tick(user), due
        inp = self.decoder.decode(m.topic, m.value, m.timestamp, now_ms)
        if not isinstance(inp, Invalid):
            inp = self._key_policy(m, inp)
        if isinstance(inp, Invalid):
            self._dead(m, inp, out)
            return None, 0
        match inp:
            case Event() | ProfileUpdate() | Enroll() | Release():
                return inp, inp.ts
            case Feedback() | CallResult():
                return inp, m.timestamp or now_ms
            case Tick():
                return inp, now_ms
            case _:
                assert_never(inp)

    def _key_policy(self, m: Message, inp: Input | Release) -> Input | Release | Invalid:
        """A user's inputs must all reach the partition that holds the user's state: the message key
        is the user id (README "Keys and partitions")."""
        if m.key is None:
            if self.keyless == "dead_letter":
                return Invalid("missing_key", "no message key: key input messages by user_id")
            return inp
        if m.key != inp.user_id.encode():
            return Invalid(
                "key_mismatch", "the message key is not the user_id: the user would be split across partitions"
            )
        return inp

    def _dead(self, m: Message, bad: Invalid, out: BatchOutput) -> None:
        """The message to the dead-letter topic with its reason; as a stub (sizes and hashes, the
        coordinates to fetch the original) when it would not fit in a dead-letter message."""
        out.invalid.append((m.topic, bad.reason))
        headers = wire.dead_letter_headers(bad.reason, bad.detail, m.topic, m.partition, m.offset)
        headers += [(f"original.{k}", v) for k, v in m.headers or ()]
        key, value = m.key, m.value or b""
        if len(value) + len(key or b"") > self.dead_letter_max_bytes:
            key, value, headers = wire.dead_letter_stub(key, value, headers)
        out.records.append(Record(self.topics.dead_letter, key, value, headers))

    def _effects(
        self,
        effects: Iterable[Effect],
        p: int,
        out: BatchOutput,
        timer_ops: dict[int, dict[tuple[int, str], bool]],
        cancels: bool,
    ) -> None:
        for fx in effects:
            match fx:
                case Count():
                    out.counts.append(fx)
                case SendRequest():
                    self._record(self.topics.channel(fx.channel), wire.encode_send_request(fx), out)
                    out.sends[fx.channel] = out.sends.get(fx.channel, 0) + 1
                case TimerSet():
                    timer_ops.setdefault(p, {})[(fx.due, fx.user_id)] = True
                    out.timers_set[p] = out.timers_set.get(p, 0) + 1
                    out.earliest_timer[p] = min(out.earliest_timer.get(p, fx.due), fx.due)
                case TimerCleared():
                    ops = timer_ops.setdefault(p, {})
                    if ops.get((fx.due, fx.user_id)) is True:
                        del ops[(fx.due, fx.user_id)]  # set and cleared within this batch
                    else:
                        ops[(fx.due, fx.user_id)] = False
                    out.timers_cleared[p] = out.timers_cleared.get(p, 0) + 1
                    out.timers_cancelled += cancels
                case ProfileChanged():
                    self._record(self.topics.profile_changes, wire.encode_profile_change(fx), out)
                case CallRequest():
                    self._record(self.topics.calls, wire.encode_call_request(fx), out)
                case _:
                    assert_never(fx)

    @staticmethod
    def _record(topic: str, enc: wire.Encoded, out: BatchOutput) -> None:
        out.records.append(Record(topic, enc.key, enc.value, enc.headers))
