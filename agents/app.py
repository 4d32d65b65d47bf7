"""The Faust app: topics, the journey state table, the journey agent and the timer scanner.

Faust provides the consumer group, partition assignment (input topics, ticks and the state
table's changelog are co-partitioned by user id), the RocksDB store per partition and its restore
from the changelog after a rebalance. The hot path avoids Faust's per-message table writes: each
batch from `take_events` goes through `agents.batch.BatchCore`, its records are produced with
confluent-kafka and awaited once, then written to the partition's RocksDB in one WriteBatch
(`agents.store`), and only then are the events acknowledged (at-least-once input, idempotent
effects). Read positions and event-time progress per input live in `agents.positions`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, cast

import faust

from nudgeflow.agents import metrics
from nudgeflow.agents.align import Aligner
from nudgeflow.agents.batch import BatchCore, BatchOutput, Item, Message
from nudgeflow.agents.output import Output
from nudgeflow.agents.positions import InputPositions
from nudgeflow.agents.store import StateStore
from nudgeflow.agents.timers import TimerScanner, event_time_gate
from nudgeflow.engine.graph import JourneySet
from nudgeflow.engine.io import Tick
from nudgeflow.settings import Settings
from nudgeflow.streams.events import Decoder
from nudgeflow.streams.topics import Topics

log = logging.getLogger("nudgeflow.worker")
TABLE = "journey-state"
END_MARKER = b"m:end"  # see Settings.changelog_end_marker; restored like any key, never read


@dataclass(frozen=True, slots=True)
class Pending:
    """A decoded input waiting to be applied, with the Faust event to acknowledge once it is
    durable (None for in-process timer ticks, which have no offset)."""

    item: Item
    event: Any | None


def _headers(raw: Any) -> list[tuple[str, bytes]] | None:
    """Faust gives a message's headers as a list of pairs or a mapping."""
    if not raw:
        return None
    pairs = raw.items() if hasattr(raw, "items") else raw
    return [(str(k), v if isinstance(v, bytes) else str(v).encode()) for k, v in pairs]


class Runtime:
    """Everything the agent and the scanner share inside one worker process."""

    def __init__(
        self, app: faust.App, table: Any, journeys: JourneySet, topics: Topics, output: Output, settings: Settings
    ) -> None:
        self.app, self.topics, self.output = app, topics, output
        self.store = StateStore(table)
        decoder = Decoder(settings.max_event_bytes, settings.max_future_ms, settings.topic_prefix)
        self.core = BatchCore(
            journeys,
            topics,
            decoder,
            release_quarantined=settings.release_quarantined,
            keyless=settings.keyless,
            dead_letter_max_bytes=settings.dead_letter_max_bytes,
        )
        self.scanner = TimerScanner(self.store, settings.timer_grace_ms, settings.timer_fire_limit)
        self.changelog = table.changelog_topic.get_topic_name()
        self._rebalance_started: float | None = time.monotonic()  # the first restore counts from start
        self.event_inputs = topics.user_inputs
        self.aligner: Aligner[Pending] = Aligner(self.event_inputs)
        self.positions = InputPositions(app, self.event_inputs, self.aligner)
        self.lock = asyncio.Lock()  # the agent and the timer task both apply inputs
        self.end_marker = settings.changelog_end_marker

    async def process(self, events: Sequence[Any]) -> None:
        """One batch from the agent: decode, align by event time, apply what may go now."""
        t0 = time.perf_counter()
        msgs = [
            Message(
                e.message.topic,
                e.message.partition,
                e.message.offset,
                e.message.key,
                e.message.value,
                int(e.message.timestamp * 1000) if e.message.timestamp else None,
                _headers(e.message.headers),
            )
            for e in events
        ]
        by_offset = {(e.message.topic, e.message.partition, e.message.offset): e for e in events}
        async with self.lock:
            out = BatchOutput()
            ready: list[Pending] = []
            for item in self.core.decode(msgs, out):
                m = item.msg
                ev = by_offset[(m.topic, m.partition, m.offset)]
                if m.topic in self.aligner.event_topics:
                    ev.message.incref()  # held until applied: the agent's own ack must not commit it
                ready += self.aligner.add(m.topic, m.partition, m.offset, item.at, Pending(item, ev))
            for m in msgs:  # read positions include inputs that were dropped or dead-lettered
                self.aligner.note_read(m.topic, m.partition, m.offset)
            ready += self.aligner.release(await self._lagging())
            await self._apply(ready, out, len(msgs), t0)

    async def release_held(self) -> None:
        """Apply held inputs whose turn came without a new batch (a lagging topic caught up)."""
        if not self.aligner.held:
            return
        async with self.lock:
            ready = self.aligner.release(await self._lagging())
            if ready:
                await self._apply(ready, BatchOutput(), 0, time.perf_counter())

    async def _apply(self, ready: Sequence[Pending], out: BatchOutput, n: int, t0: float) -> None:
        self.core.apply([p.item for p in ready], self.store, out)
        await self.output.deliver(lambda: self._produce(out), self._delivery_failed)
        if self.end_marker and out.writes:  # a batch of its own (see Settings.changelog_end_marker)
            await self.output.deliver(lambda: self._produce_end_markers(out), self._delivery_failed)
        self.store.write(out.writes)
        for pending in ready:
            if pending.event is not None and pending.item.msg.topic in self.aligner.event_topics:
                pending.event.ack()  # durable now: the offset may be committed
        self._account(out, n, t0)

    async def _lagging(self) -> Callable[[str, int], bool]:
        lag = await self.positions.lagging(list(self.aligner.bufs))
        return lambda topic, p: lag.get((topic, p), False)

    def _produce(self, out: BatchOutput) -> None:
        for p, writes in out.writes.items():
            for key, value in writes:
                self.output.produce(self.changelog, value, key=key, partition=p)
        for r in out.records:
            self.output.produce(r.topic, r.value, key=r.key, headers=r.headers, partition=r.partition)

    def _produce_end_markers(self, out: BatchOutput) -> None:
        for p in out.writes:
            self.output.produce(self.changelog, b"1", key=END_MARKER, partition=p)

    def _delivery_failed(self, e: Exception, retry_in: float) -> None:
        metrics.DELIVERY_FAILURES.inc()
        log.error("a batch's records could not be written (%s): inputs held, retrying in %.1fs", e, retry_in)

    def _account(self, out: BatchOutput, n: int, t0: float) -> None:
        now = time.time()
        for topic, k in out.consumed.items():
            metrics.EVENTS.labels(self.topics.base(topic)).inc(k)
        for topic, reason in out.invalid:
            metrics.INVALID.labels(self.topics.base(topic), reason).inc()
        if out.invalid:
            log.warning("%d invalid message(s) sent to %s", len(out.invalid), self.topics.dead_letter)
        if out.duplicates:
            metrics.DUPLICATES.inc(out.duplicates)
        for user, error in out.quarantined:
            metrics.QUARANTINED.inc()
            log.error("user %s quarantined: %s while applying an input (state kept, timers held)", user, error)
        if out.released:
            metrics.RELEASED.inc(out.released)
            log.info("%d quarantined user(s) released", out.released)
        if out.parked:
            metrics.PARKED.labels("parked").inc(out.parked)
        if out.parked_overflow:
            metrics.PARKED.labels("dead_lettered").inc(out.parked_overflow)
        for c in out.counts:
            metrics.count(c)
        for _, due, stale in out.ticks:
            if stale:
                metrics.TIMERS_STALE.inc()
            else:
                metrics.TIMERS_FIRED.inc()
                metrics.TIMER_LATENESS.observe(max(0.0, now - due / 1000))
        if out.timers_cancelled:
            metrics.TIMERS_CANCELLED.inc(out.timers_cancelled)
        for p in set(out.timers_set) | set(out.timers_cleared):
            self.scanner.applied(p, out.timers_set.get(p, 0), out.timers_cleared.get(p, 0))
        for p, due in out.earliest_timer.items():
            self.scanner.rewind(p, due)
        self.positions.applied(out.max_ts)
        metrics.HELD_INPUTS.set(self.aligner.held)
        if n:
            metrics.BATCH_SIZE.observe(n)
        metrics.BATCH_SECONDS.observe(time.perf_counter() - t0)

    async def on_recovered(self) -> None:
        """State (and timers) of the newly assigned partitions are restored: start their timers."""
        actives = {tp.partition for tp in self.app.assignor.assigned_actives() if tp.topic == self.topics.ticks}
        new = actives - set(self.scanner.partitions)
        gone = set(self.scanner.partitions) - actives
        self.scanner.revoke(gone)
        self.scanner.assign(new)
        if self._rebalance_started is not None:
            metrics.RESTORE_SECONDS.set(time.monotonic() - self._rebalance_started)
            self._rebalance_started = None
        log.info("active partitions %s; pending timers %s", sorted(actives), dict(self.scanner.pending))

    async def on_revoked(self, sender: Any, *args: Any, signal: Any = None, **kwargs: Any) -> None:
        """Faust's on_partitions_revoked signal: handler(app, revoked, signal=...)."""
        revoked = args[0] if args else kwargs.get("revoked", ())
        self._rebalance_started = time.monotonic()
        gone = {tp.partition for tp in revoked if tp.topic == self.topics.ticks}
        self.aligner.drop(gone)  # not acked: the partitions' new owner reads them again
        self.positions.forget(gone)
        self.scanner.revoke(gone)

    async def gates(self) -> dict[int, float]:
        """Event-time gate of each active partition: see agents.timers.event_time_gate."""
        partitions = self.scanner.partitions
        lag = await self.positions.lagging(partitions)
        newest = self.positions.newest
        out = {}
        for p in partitions:
            inputs = [(lag[(t, p)] or self.aligner.holding(t, p), newest.get((t, p))) for t in self.event_inputs]
            gate = out[p] = event_time_gate(inputs)
            if gate == float("inf"):
                lag_s = 0.0
            elif gate == float("-inf"):
                lag_s = -1.0
            else:
                lag_s = max(0.0, time.time() - gate / 1000)
            metrics.EVENT_TIME_LAG.labels(str(p)).set(lag_s)
        return out

    async def scan(self) -> None:
        if self.app.rebalancing or self.app.in_recovery:
            return
        await self.release_held()
        gates = await self.gates()
        due = self.scanner.collect_due(int(time.time() * 1000), lambda p: gates.get(p, float("inf")))
        if due:
            async with self.lock:
                ticks = [
                    Pending(Item(Message(self.topics.ticks, p, -1, user.encode(), None, None), Tick(user), at), None)
                    for p, at, user in due
                ]
                await self._apply(ticks, BatchOutput(), 0, time.perf_counter())


def build_app(settings: Settings, journeys: JourneySet) -> tuple[faust.App, Runtime]:
    """The worker's Faust app for these settings (the broker already resolved to kafka://...)."""
    s, partitions = settings, settings.partitions
    topics = Topics(s.topic_prefix)
    app = faust.App(
        s.app_id,
        broker=f"kafka://{s.bootstrap}",
        store="rocksdb://",
        datadir=str(s.data_dir),
        topic_partitions=partitions,
        consumer_auto_offset_reset="earliest",
        web_enabled=False,
        producer_linger_ms=5,
        broker_session_timeout=s.session_timeout_s,
        broker_heartbeat_interval=s.heartbeat_s,
        broker_rebalance_timeout=s.rebalance_timeout_s,
        topic_allow_declare=True,
        consumer_max_fetch_size=s.max_fetch_bytes,
    )
    table = app.Table(
        TABLE,
        partitions=partitions,
        key_type=bytes,
        value_type=bytes,
        options={
            "driver": "rocksdict",
            "block_cache_size": s.block_cache_mb * 2**20,
            # bounded memtables: memory per partition stays ~2 x write_buffer_mb + the block cache
            "write_buffer_size": s.write_buffer_mb * 2**20,
            "max_write_buffer_number": 2,
        },
        help="per-user journey state and the timer index",
    )
    source = app.topic(*topics.inputs, key_serializer="raw", value_serializer="raw", partitions=partitions)
    runtime = Runtime(app, table, journeys, topics, Output(s.bootstrap), s)

    async def journeys_agent(stream: Any) -> None:
        async for events in stream.take_events(s.batch_max, within=s.batch_within_ms / 1000):
            await runtime.process(events)

    async def fire_timers() -> None:
        await runtime.scan()

    app.agent(source, name="journeys")(journeys_agent)
    app.timer(s.timer_interval_ms / 1000, name="fire_timers")(fire_timers)
    table.on_recover(runtime.on_recovered)
    app.on_partitions_revoked.connect(cast(Any, runtime.on_revoked))  # mode's handler type is not satisfiable
    return app, runtime
