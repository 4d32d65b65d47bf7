"""One batch of input messages -> state writes, changelog records and output records.

Faust-free and Kafka-free on purpose: the pipeline feeds it confluent-kafka messages, the tests
and benchmarks feed it `Raw` messages (anything with confluent-kafka's message accessors).

The hot path, per batch: decode every message (invalid ones become dead-letter records at once;
events no journey or history uses are dropped before any state is read), group the inputs by user
(each user's in their order), then take one user at a time: decode the record, apply its inputs
*in place*, serialise it. Users' states are independent, so only each user's own order matters,
and a record is read, changed and written while its objects are in the CPU's caches (in event
order, every input found its record cold: the worker ran ~1.5x slower). The stored bytes of
records live in a bounded cache across batches (a user active now is usually active again soon),
so a warm user costs no RocksDB read; a cold one is read once per batch (multi-get). The engine
reports to a `BatchSink`, which tallies analytics counts per batch (the metrics are updated once
per batch, not per event), encodes send requests as they are made and keeps the timer-index
operations.

In-place is safe because a batch is all or nothing: nothing of it is produced before the whole
batch is computed. If the engine raises for some user, the cached records the batch touched are
dropped and the batch is computed again in *safe mode*, where every input is applied to a copy:
the user whose input raised is quarantined with the state it had before that input, everyone
else goes on.

A per-user record of the last input offset per topic makes replays (after a crash between
producing and recording the input positions) no-ops: no duplicate sends, no double counting.
"""

from __future__ import annotations

import itertools
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, fields
from typing import Any, NotRequired, Protocol, TypedDict, assert_never, cast

import orjson
from msgspec import Struct

from nudgeflow.agents.keys import timer_key, user_key
from nudgeflow.agents.occupancy import OCCUPANCY, Occupancy, Steps, steps_of
from nudgeflow.engine import core
from nudgeflow.engine.graph import JourneySet
from nudgeflow.engine.io import (
    CallRequest,
    CallResult,
    Count,
    CountKey,
    Enroll,
    Event,
    Feedback,
    Input,
    MemberCheck,
    ProfileChanged,
    ProfileUpdate,
    SendRequest,
    Tick,
    TimerCleared,
    TimerSet,
)
from nudgeflow.engine.schema import CHANNELS
from nudgeflow.engine.state import UserState, clone, next_wake
from nudgeflow.streams import wire
from nudgeflow.streams.events import Decoder, Invalid, Release
from nudgeflow.streams.topics import Topics

NO_TIMESTAMP = 0  # confluent-kafka's TIMESTAMP_NOT_AVAILABLE


class Message(Protocol):
    """The accessors of a confluent_kafka.Message, which the pipeline passes as they come (messages
    that carry an error never get here: they have a topic, partition and offset)."""

    def topic(self) -> str: ...

    def partition(self) -> int: ...

    def offset(self) -> int: ...

    def key(self) -> bytes | None: ...

    def value(self) -> bytes | None: ...

    def timestamp(self) -> tuple[int, int]: ...

    def headers(self) -> list[tuple[str, bytes]] | None: ...


@dataclass(slots=True)
class Raw:
    """A message held in memory (tests, benchmarks, parked inputs) with confluent-kafka's accessors."""

    topic_: str
    partition_: int
    offset_: int
    key_: bytes | None
    value_: bytes | None
    timestamp_: int | None = None  # Kafka message timestamp, ms
    headers_: list[tuple[str, bytes]] | None = None

    def topic(self) -> str:
        return self.topic_

    def partition(self) -> int:
        return self.partition_

    def offset(self) -> int:
        return self.offset_

    def key(self) -> bytes | None:
        return self.key_

    def value(self) -> bytes | None:
        return self.value_

    def timestamp(self) -> tuple[int, int]:
        return (1, self.timestamp_) if self.timestamp_ is not None else (NO_TIMESTAMP, -1)

    def headers(self) -> list[tuple[str, bytes]] | None:
        return self.headers_


def kafka_ts(m: Message) -> int | None:
    kind, ts = m.timestamp()
    return ts if kind != NO_TIMESTAMP and ts > 0 else None


class Item(Struct, gc=False):
    """A decoded input, where it came from, and the time it applies at. Timer ticks fired by the
    scanner have no message and offset -1. (A Struct, like the engine's inputs: made in C, one per
    input message.)"""

    topic: str
    partition: int
    offset: int
    input: Input | Release
    at: int
    msg: Message | None = None


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


def record_wake(raw: bytes | None) -> int | None:
    """The next wake-up of a stored record (for rebuilding the timer index on restore)."""
    if raw is None:
        return None
    return next_wake(upgrade_record(orjson.loads(raw))["state"])


MAX_PARKED = 1000  # inputs kept per quarantined user; later ones go to the dead-letter topic


@dataclass(slots=True)
class Record:
    """A message to produce: to an output topic (sends, calls, dead letters, ...)."""

    topic: str
    key: bytes | None
    value: bytes
    headers: list[tuple[str, bytes]] | None = None
    partition: int | None = None


Write = tuple[bytes, bytes | None]  # (key, value); None deletes


@dataclass
class BatchOutput:
    """What a batch produced. `writes[p]` go to partition p's RocksDB *and* its changelog (user
    records, input positions); `local[p]` go to RocksDB only (the timer index, which a restore
    rebuilds from the records)."""

    writes: dict[int, list[Write]] = field(default_factory=dict)
    local: dict[int, list[Write]] = field(default_factory=dict)
    records: list[Record] = field(default_factory=list)
    counts: Counter[CountKey] = field(default_factory=Counter)
    invalid: list[tuple[str, str]] = field(default_factory=list)  # (topic, reason)
    consumed: dict[str, int] = field(default_factory=dict)  # topic -> messages
    read: dict[tuple[str, int], int] = field(default_factory=dict)  # (topic, p) -> offset of the last message read
    timers_set: dict[int, int] = field(default_factory=dict)  # partition -> +n
    timers_cleared: dict[int, int] = field(default_factory=dict)
    timers_cancelled: int = 0  # cleared by an event before they were due (e.g. a purchase)
    earliest_timer: dict[int, int] = field(default_factory=dict)  # partition -> min due set
    ticks: list[tuple[int, int, bool]] = field(default_factory=list)  # (partition, due, stale) processed
    duplicates: int = 0
    sent_by: dict[tuple[str, str, str], int] = field(default_factory=dict)  # (channel, journey, step) -> n
    sent_at: list[int] = field(default_factory=list)  # created_at of each send request (latency)
    dropped_upto: dict[tuple[str, int], int] = field(default_factory=dict)  # newest event time of unused events
    quarantined: list[tuple[str, str]] = field(default_factory=list)  # (user, error type) set aside now
    released: int = 0
    parked: int = 0
    parked_overflow: int = 0
    serialized: dict[tuple[int, str], bytes] = field(default_factory=dict)  # (partition, user) -> record written
    positions: dict[tuple[str, int], int] = field(default_factory=dict)  # (topic, p) -> where input resumes


class StateReader(Protocol):
    def get_many(self, partition: int, keys: list[bytes]) -> list[bytes | None]: ...


class BatchSink:
    """The engine's Sink while a batch is applied. Counts are appended as they come (`count` is
    `list.append`: no Python call for the several counts an event makes) and tallied once per
    batch; messages are encoded as made. The timer index changes once per user and batch, from the
    wake-up the user had when the batch took them up to the one they have when it is done with
    them (`user_done`): every move in between is a pair that would cancel in the index."""

    __slots__ = (
        "cancels",
        "channel_topics",
        "count",
        "moved",
        "out",
        "signer",
        "tallies",
        "topics",
        "wake",
        "was",
    )

    def __init__(self, topics: Topics, out: BatchOutput, signer: wire.Signer = wire.UNSIGNED) -> None:
        self.topics, self.out, self.signer = topics, out, signer
        self.channel_topics = {c: topics.channel(c) for c in CHANNELS}
        self.tallies: list[CountKey] = []
        self.count: Callable[[CountKey], None] = self.tallies.append
        self.cancels = False  # whether a cleared timer counts as cancelled (an event, not a tick)
        self.moved = False  # the current user's wake-up moved in this batch: from `was` to `wake`
        self.was: int | None = None
        self.wake: int | None = None

    def emit(self, fx: SendRequest | CallRequest | ProfileChanged) -> None:
        out = self.out
        match fx:
            case SendRequest():
                enc = wire.encode_send_request(fx, self.signer)
                out.records.append(Record(self.channel_topics[fx.channel], enc.key, enc.value, enc.headers))
                by = (fx.channel, fx.journey, fx.step)
                out.sent_by[by] = out.sent_by.get(by, 0) + 1
                out.sent_at.append(fx.created_at)
            case ProfileChanged():
                enc = wire.encode_profile_change(fx)
                out.records.append(Record(self.topics.profile_changes, enc.key, enc.value, enc.headers))
            case CallRequest():
                enc = wire.encode_call_request(fx, self.signer)
                out.records.append(Record(self.topics.calls, enc.key, enc.value, enc.headers))
            case _:
                assert_never(fx)

    def timer(self, user: str, old: int | None, new: int | None) -> None:
        if not self.moved:
            self.moved, self.was = True, old
        self.wake = new
        if old is not None and self.cancels:
            self.out.timers_cancelled += 1

    def user_done(self, p: int, user: str) -> None:
        """The batch is done with this user: their index entry moves (if it did) in one change."""
        self.moved = False
        was, wake, out = self.was, self.wake, self.out
        if was == wake:
            return
        ops = out.local.get(p)
        if ops is None:
            ops = out.local[p] = []
        if was is not None:
            ops.append((timer_key(was, user), None))
            out.timers_cleared[p] = out.timers_cleared.get(p, 0) + 1
        if wake is not None:
            ops.append((timer_key(wake, user), b"1"))
            out.timers_set[p] = out.timers_set.get(p, 0) + 1
            if wake < out.earliest_timer.get(p, wake + 1):
                out.earliest_timer[p] = wake

    def tally(self) -> None:
        """The batch's counts into its output, one tally (a C loop) for all of them."""
        self.out.counts.update(self.tallies)
        self.tallies.clear()


class _Redo(Exception):
    """The engine raised in fast (in-place) mode: compute the batch again in safe mode."""


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
        cache_users: int = 100_000,
        signer: wire.Signer = wire.UNSIGNED,
        state_max_bytes: int = 256 * 1024,
    ) -> None:
        self.journeys, self.topics, self.decoder, self.clock = journeys, topics, decoder, clock
        self.ticks_topic, self.feedback_topic = topics.ticks, topics.feedback
        self.release_all = release_quarantined  # Settings.release_quarantined
        self.keyless = keyless  # Settings.keyless: "accept" or "dead_letter"
        self.dead_letter_max_bytes = dead_letter_max_bytes
        self.cache_users = cache_users
        self.signer = signer  # Settings.topic_secret: verifies feedback, signs sends and calls
        self.state_max_bytes = state_max_bytes  # Settings.state_max_bytes: a user's state, serialised
        # stored bytes of records: those written to the store (least recently used first, bounded),
        # and those of batches computed but not yet written (what a read must see)
        self.cache: dict[tuple[int, str], bytes] = {}
        # the records of each batch computed but not yet written (oldest first; one, at most two)
        self.pending: list[dict[tuple[int, str], bytes]] = []
        self.occupancy = Occupancy()  # users per journey step, per partition (agents.occupancy)

    # --- decoding ------------------------------------------------------------------------------

    def run(self, msgs: Sequence[Message], store: StateReader) -> BatchOutput:
        """Decode and apply in message order (no cross-topic alignment)."""
        out = BatchOutput()
        self.apply(self.decode(msgs, out), store, out)
        return out

    def decode(self, msgs: Iterable[Message], out: BatchOutput) -> list[Item]:
        """Messages -> inputs with their time. Invalid ones go to the dead-letter records now;
        events no journey or history uses are dropped here (no state read, no write)."""
        now_ms = int(self.clock() * 1000)
        items: list[Item] = []
        watched = self.journeys.watched
        consumed, read = out.consumed, out.read
        decode, ticks, feedback = self.decoder.decode, self.ticks_topic, self.feedback_topic
        key_policy, dropped = self._key_policy, out.dropped_upto
        for m in msgs:
            topic, p, offset = m.topic(), m.partition(), m.offset()
            consumed[topic] = consumed.get(topic, 0) + 1
            read[topic, p] = offset
            if topic != ticks and topic != feedback:  # a user input: an event, most of the time
                # the Kafka timestamp matters only to a message without a valid `ts` of its own,
                # which decodes as Invalid without it: only then is it decoded again with it
                inp = decode(topic, m.value(), None, now_ms)
                if isinstance(inp, Event) and key_policy(m, inp) is inp:
                    got: Input | Release | None = inp
                    at = inp.ts
                else:
                    if isinstance(inp, Invalid):
                        inp = decode(topic, m.value(), kafka_ts(m), now_ms)
                    got, at = self._checked(m, inp, now_ms, out)
            else:
                got, at = self._decode(m, topic, now_ms, out)
            if got is None:
                continue
            if isinstance(got, Event) and got.name not in watched:
                # not applied, but how far the topic has got in event time still counts: the
                # aligner must not wait for a busy topic whose events no journey uses
                if at > dropped.get((topic, p), -1):
                    dropped[topic, p] = at
                continue
            items.append(Item(topic, p, offset, got, at, m))
        return items

    def _decode(self, m: Message, topic: str, now_ms: int, out: BatchOutput) -> tuple[Input | Release | None, int]:
        if topic == self.ticks_topic:
            try:
                user, due = wire.decode_tick(m.value())
            except wire.WireError as e:
                self._dead(m, Invalid("bad_message", str(e)), out)
                return None, 0
            return Tick(user), due
        if topic == self.feedback_topic and not self.signer.valid("feedback", m.key(), m.value(), m.headers()):
            self._dead(m, Invalid("bad_signature", "feedback without a valid signature (NUDGEFLOW_TOPIC_SECRET)"), out)
            return None, 0
        return self._checked(m, self.decoder.decode(topic, m.value(), kafka_ts(m), now_ms), now_ms, out)

    def _checked(
        self, m: Message, decoded: Input | Release | Invalid, now_ms: int, out: BatchOutput
    ) -> tuple[Input | Release | None, int]:
        """A decoded message past the key policy, with the time it applies at (None: dead-lettered)."""
        inp = self._key_policy(m, decoded) if not isinstance(decoded, Invalid) else decoded
        if isinstance(inp, Invalid):
            self._dead(m, inp, out)
            return None, 0
        match inp:
            case Event() | ProfileUpdate() | Enroll() | Release():
                return inp, inp.ts
            case Feedback() | CallResult():
                return inp, kafka_ts(m) or now_ms
            case Tick() | MemberCheck():  # in-process inputs: never on a topic
                return inp, now_ms
            case _:
                assert_never(inp)

    def _key_policy(self, m: Message, inp: Input | Release) -> Input | Release | Invalid:
        """A user's inputs must all reach the partition that holds the user's state: the message key
        is the user id (README "Keys")."""
        key = m.key()
        if key is None:
            if self.keyless == "dead_letter":
                return Invalid("missing_key", "no message key: key input messages by user_id")
            return inp
        if key != inp.user_id.encode():
            return Invalid(
                "key_mismatch", "the message key is not the user_id: the user would be split across partitions"
            )
        return inp

    def _dead(self, m: Message, bad: Invalid, out: BatchOutput) -> None:
        """The message to the dead-letter topic with its reason; as a stub (sizes and hashes, the
        coordinates to fetch the original) when it would not fit in a dead-letter message."""
        topic, partition, offset = m.topic(), m.partition(), m.offset()
        out.invalid.append((topic, bad.reason))
        headers = wire.dead_letter_headers(bad.reason, bad.detail, topic, partition, offset)
        headers += [(f"original.{k}", v) for k, v in m.headers() or ()]
        key, value = m.key(), m.value() or b""
        if len(value) + len(key or b"") > self.dead_letter_max_bytes:
            key, value, headers = wire.dead_letter_stub(key, value, headers)
        out.records.append(Record(self.topics.dead_letter, key, value, headers))

    # --- applying ------------------------------------------------------------------------------

    def apply(self, items: Sequence[Item], store: StateReader, out: BatchOutput) -> None:
        """Run the engine over the inputs in the given order; each touched record written once."""
        records, invalid = len(out.records), len(out.invalid)  # what decoding produced
        try:
            self._apply(items, store, out, safe=False)
        except _Redo:  # nothing of the first pass left this batch: compute it again, safely
            del out.records[records:]
            del out.invalid[invalid:]
            fresh = BatchOutput(records=out.records, invalid=out.invalid, consumed=out.consumed, read=out.read)
            for f in fields(BatchOutput):
                setattr(out, f.name, getattr(fresh, f.name))
            self._apply(items, store, out, safe=True)

    def _stored(self, keys: Iterable[tuple[int, str]], store: StateReader) -> dict[tuple[int, str], bytes | None]:
        """The stored bytes of these (partition, user) records (None: no record yet): not yet
        written, cached, or read from the store (one multi-get per partition)."""
        pending, cache = self.pending[::-1], self.cache  # the newest first
        found: dict[tuple[int, str], bytes | None] = {}
        missing: dict[int, list[str]] = {}
        for key in keys:
            raw = None
            for batch in pending:
                raw = batch.get(key)
                if raw is not None:
                    break
            else:
                raw = cache.get(key)
            found[key] = raw
            if raw is None:
                missing.setdefault(key[0], []).append(key[1])
        for p, users in missing.items():
            for u, raw in zip(users, store.get_many(p, [user_key(u) for u in users]), strict=True):
                found[(p, u)] = raw
        return found

    def _apply(self, items: Sequence[Item], store: StateReader, out: BatchOutput, safe: bool) -> None:
        # one user at a time: the record is decoded, every input of the user in this batch applied
        # (in their order), serialised and released while its objects are in the CPU's caches. In
        # event order instead, each input finds its user's record cold (thousands of records
        # decoded at the start of the batch): reading, changing and serialising it cost twice as
        # much. Users' states are independent, so only each user's own order matters.
        by_user: dict[tuple[int, str], list[Item]] = {}
        for item in items:
            key = (item.partition, item.input.user_id)
            group = by_user.get(key)
            if group is None:
                by_user[key] = [item]
            else:
                group.append(item)
        stored = self._stored(by_user, store)
        sink = BatchSink(self.topics, out, self.signer)
        now_ms = int(self.clock() * 1000)
        serialized, dumps, loads, max_bytes = out.serialized, orjson.dumps, orjson.loads, self.state_max_bytes
        journeys, apply_engine, occupancy = self.journeys, core.apply, self.occupancy
        writes = out.writes
        moves: list[tuple[int, Steps, Steps]] = []
        for key, group in by_user.items():
            p = key[0]
            raw = stored[key]
            rec: UserRecord = (
                upgrade_record(loads(raw)) if raw is not None else {"state": core.new_state(), "offsets": {}}
            )
            old = steps_of(rec["state"])
            offsets = rec["offsets"]
            changed = False
            wake: int | None = core.UNKNOWN_WAKE  # the state's next wake-up, once an input has told
            for item in group:
                offset, topic = item.offset, item.topic
                if offset >= 0 and offsets.get(topic, -1) >= offset:
                    out.duplicates += 1  # already applied before a crash or rebalance
                    continue
                inp = item.input
                # the hot path: events and timer ticks of a user in good standing, in place
                if (inp.__class__ is Event or inp.__class__ is Tick) and not safe and "quarantine" not in rec:
                    if inp.__class__ is Tick:  # stale: the user's wake-up moved or already ran (a duplicate tick)
                        if wake == core.UNKNOWN_WAKE:
                            wake = next_wake(rec["state"])
                        out.ticks.append((p, item.at, wake != item.at))
                    sink.cancels = inp.__class__ is Event  # a cleared timer counts as cancelled by an event, not a tick
                    try:
                        wake = apply_engine(rec["state"], inp, item.at, journeys, sink, now_ms, wake)
                    except Exception as e:
                        raise _Redo from e
                    if offset >= 0:  # in-process ticks have none: they are idempotent by themselves
                        offsets[topic] = offset
                else:
                    wake = core.UNKNOWN_WAKE
                    if not self._apply_item(rec, item, sink, now_ms, out, safe):
                        continue
                changed = True
            if sink.moved:
                sink.user_done(p, key[1])
            if not changed:
                continue
            value = serialized[key] = dumps(rec)
            if len(value) > max_bytes and not safe:
                raise _Redo  # safe mode finds the input that made the state too large
            w = writes.get(p)
            if w is None:
                w = writes[p] = []
            w.append((user_key(key[1]), value))
            new = steps_of(rec["state"])
            if old != new:
                moves.append((p, old, new))
        # what outlives the batch changes only once it is computed whole (a redo starts afresh)
        if serialized:
            self.pending.append(serialized)
        sink.tally()
        for p, old, new in moves:
            occupancy.move(p, old, new)
        for p in {p for p, _, _ in moves}:  # durable with the records that moved
            writes[p].append((OCCUPANCY, occupancy.encoded(p)))

    def _apply_item(
        self, rec: UserRecord, item: Item, sink: BatchSink, now_ms: int, out: BatchOutput, safe: bool
    ) -> bool:
        """One input for one user's record, in place (not yet a duplicate); whether it changed."""
        inp, offset, topic, p = item.input, item.offset, item.topic, item.partition
        if "quarantine" in rec:
            if not (isinstance(inp, Release) or self.release_all):
                return self._park(rec, item, out)
            self._release(rec, p, inp.user_id, now_ms, sink, out, safe)
            if "quarantine" in rec:  # a parked input raised again: this one waits behind it
                self._park(rec, item, out)
                return True
        if isinstance(inp, Release):  # (released or never quarantined) run what fell due meanwhile
            self._engine(rec, Tick(inp.user_id), p, self.ticks_topic, -1, item.at, None, sink, now_ms, safe)
        else:
            if isinstance(inp, Tick):  # stale: the user's wake-up moved or already ran (a duplicate tick)
                out.ticks.append((p, item.at, next_wake(rec["state"]) != item.at))
            self._engine(rec, inp, p, topic, offset, item.at, item.msg, sink, now_ms, safe)
        if offset >= 0:  # in-process ticks have none: they are idempotent by themselves
            rec["offsets"][topic] = offset
        return True

    def _engine(
        self,
        rec: UserRecord,
        inp: Input,
        p: int,
        topic: str,
        offset: int,
        at: int,
        msg: Message | None,
        sink: BatchSink,
        now_ms: int,
        safe: bool,
    ) -> None:
        """The engine over one input, in place. In safe mode on a copy, its effects kept aside: an
        exception quarantines this user alone, with the state as it was before the input."""
        sink.cancels = not isinstance(inp, Tick)
        if not safe:
            try:
                core.apply(rec["state"], inp, at, self.journeys, sink, now_ms)
            except Exception as e:
                raise _Redo from e
            return
        state, effects = clone(rec["state"]), core.EffectList()
        try:
            core.apply(state, inp, at, self.journeys, effects, now_ms)
        except Exception as e:  # a bug or an edit the engine cannot follow: never the whole batch
            rec["quarantine"] = {
                "since": now_ms,
                "error": type(e).__name__,
                "topic": topic,
                "offset": offset,
                "parked": [],
            }
            sink.out.quarantined.append((inp.user_id, type(e).__name__))
            if msg is not None and offset >= 0:
                self._park_input(rec, topic, p, offset, msg, sink.out)
            return
        if msg is not None and len(orjson.dumps(state)) > self.state_max_bytes:
            # bounded state: the input is not applied (dead-lettered, counted); the user goes on
            self._dead(
                msg, Invalid("state_too_large", f"the user's state would exceed {self.state_max_bytes} bytes"), sink.out
            )
            return
        rec["state"] = state
        for fx in effects.effects:
            match fx:
                case Count():
                    sink.count((fx.kind, fx.journey, fx.detail))
                case TimerCleared():
                    sink.timer(fx.user_id, fx.due, None)
                case TimerSet():
                    sink.timer(fx.user_id, None, fx.due)
                case SendRequest() | CallRequest() | ProfileChanged():
                    sink.emit(fx)
                case _:
                    assert_never(fx)

    def _park(self, rec: UserRecord, item: Item, out: BatchOutput) -> bool:
        """Keep a quarantined user's input for release; False when there was nothing to keep."""
        if item.offset < 0 or item.msg is None:  # a timer: held as it is in the index
            return False
        q = rec["quarantine"]
        if len(q["parked"]) >= MAX_PARKED:
            self._dead(
                item.msg, Invalid("quarantine_overflow", f"user quarantined with {MAX_PARKED} inputs parked"), out
            )
            out.parked_overflow += 1
        else:
            self._park_input(rec, item.topic, item.partition, item.offset, item.msg, out)
        rec["offsets"][item.topic] = item.offset
        return True

    @staticmethod
    def _park_input(rec: UserRecord, topic: str, p: int, offset: int, m: Message, out: BatchOutput) -> None:
        value = (m.value() or b"").decode("utf-8", "replace")
        rec["quarantine"]["parked"].append(
            {"topic": topic, "partition": p, "offset": offset, "value": value, "kafka_ts": kafka_ts(m)}
        )
        rec["offsets"][topic] = offset
        out.parked += 1

    def _release(
        self, rec: UserRecord, p: int, user: str, now_ms: int, sink: BatchSink, out: BatchOutput, safe: bool
    ) -> None:
        """Lift a user's quarantine and apply the parked inputs in order (one may quarantine the
        user again: it and the rest stay parked)."""
        parked = rec.pop("quarantine")["parked"]
        out.released += 1
        key = user.encode()
        for i, pi in enumerate(parked):
            msg = Raw(pi["topic"], pi["partition"], -1, key, pi["value"].encode(), pi["kafka_ts"])
            inp, at = self._decode(msg, pi["topic"], now_ms, out)
            if inp is None or isinstance(inp, Release):
                continue
            self._engine(rec, inp, p, pi["topic"], -1, at, None, sink, now_ms, safe)
            if "quarantine" in rec:
                rec["quarantine"]["parked"].extend(parked[i:])  # the one that raised comes first again
                break

    # --- the cache -----------------------------------------------------------------------------

    def evict(self) -> None:
        """Bound the cache: drop the least recently used records (all of them are in the store)."""
        cache = self.cache
        excess = len(cache) - self.cache_users
        if excess > 0:
            for key in list(itertools.islice(cache, excess)):
                del cache[key]

    def fold(self, into: dict[tuple[int, str], bytes], out: BatchOutput) -> None:
        """The records of the batch computed last join a larger unit that is written as one (the
        pipeline's checkpoint): reads see them there, and `written_records(into)` moves them all."""
        batch = out.serialized
        into.update(batch)
        self.pending = [layer for layer in self.pending if layer is not batch and layer is not into]
        self.pending.append(into)
        out.serialized = {}

    def written(self, out: BatchOutput) -> None:
        """A batch's writes are in the store now: their bytes move to the cache (most recent last)."""
        self.written_records(out.serialized)

    def written_records(self, done: dict[tuple[int, str], bytes]) -> None:
        """These records are in the store now: their bytes move to the cache (most recent last)."""
        cache = self.cache
        self.pending = [batch for batch in self.pending if batch is not done]  # a later one may still hold newer
        pop = cache.pop
        for key in done:
            pop(key, None)
        cache.update(done)
        self.evict()

    @property
    def unwritten(self) -> dict[tuple[int, str], bytes]:
        """What a read sees of the records computed but not yet written (the newest of each)."""
        return {key: raw for batch in self.pending for key, raw in batch.items()}

    def forget(self) -> None:
        """Drop every cached record (a rebalance, or a batch that was abandoned): they are read
        again from the store, which holds exactly what was made durable."""
        self.cache.clear()
        self.pending.clear()
        self.occupancy.forget()
