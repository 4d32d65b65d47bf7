"""The Faust app: topics, the journey state table, the journey agent and the timer scanner.

Faust provides the consumer group, partition assignment (input topics, ticks and the state
table's changelog are co-partitioned by user id), the RocksDB store per partition and its restore
from the changelog after a rebalance. The hot path avoids Faust's per-message table writes: each
batch from `take_events` goes through `agents.batch.BatchCore`, its records are produced with
confluent-kafka and awaited once, then written to the partition's RocksDB in one WriteBatch, and
only then are the events acknowledged (at-least-once input, idempotent effects).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import faust
from faust.types import TP
from rocksdict import WriteBatch

from nudgeflow.agents import metrics
from nudgeflow.agents.align import Aligner
from nudgeflow.agents.batch import BatchCore, BatchOutput, Message
from nudgeflow.agents.output import Output
from nudgeflow.agents.timers import TimerScanner, event_time_gate
from nudgeflow.engine.graph import JourneySet
from nudgeflow.engine.io import Input, Tick
from nudgeflow.streams.events import Decoder
from nudgeflow.streams.topics import Topics

log = logging.getLogger("nudgeflow.worker")
TABLE = "journey-state"
END_MARKER = b"m:end"  # see Settings.changelog_end_marker; restored like any key, never read


class Runtime:
    """Everything the agent and the scanner share inside one worker process."""

    def __init__(
        self,
        app: faust.App,
        table: Any,
        journeys: JourneySet,
        topics: Topics,
        output: Output,
        decoder: Decoder,
        grace_ms: int,
        fire_limit: int,
    ) -> None:
        self.app, self.table, self.topics, self.output = app, table, topics, output
        self.core = BatchCore(journeys, topics, decoder)
        self.scanner = TimerScanner(self._db, grace_ms, fire_limit)
        self.changelog = table.changelog_topic.get_topic_name()
        self._rebalance_started: float | None = time.monotonic()  # the first restore counts from start
        self.event_inputs = topics.user_inputs
        self.newest: dict[tuple[str, int], int] = {}  # (topic, p) -> newest event time applied
        self.aligner: Aligner[tuple[Message, Input, int, Any]] = Aligner(self.event_inputs)
        self.lock = asyncio.Lock()  # the agent and the timer task both apply inputs
        self.end_marker = False
        self._positions: dict[tuple[str, int], int | None] = {}  # fetch positions of idle inputs

    def _db(self, partition: int) -> Any:
        return self.table.data._db_for_partition(partition)

    def get_many(self, partition: int, keys: list[bytes]) -> list[bytes | None]:
        result: list[bytes | None] = self._db(partition).get(keys)
        return result

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
            )
            for e in events
        ]
        async with self.lock:
            out = BatchOutput()
            ready = []
            for (m, inp, at), ev in self._with_events(self.core.decode(msgs, out), events):
                if m.topic in self.aligner.event_topics:
                    ev.message.incref()  # held until applied: the agent's own ack must not commit it
                ready += self.aligner.add(m.topic, m.partition, m.offset, at, (m, inp, at, ev))
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

    @staticmethod
    def _with_events(items: list[Any], events: Sequence[Any]) -> list[tuple[Any, Any]]:
        by_offset = {(e.message.topic, e.message.partition, e.message.offset): e for e in events}
        return [(item, by_offset[(item[0].topic, item[0].partition, item[0].offset)]) for item in items]

    async def _apply(self, ready: list[tuple[Message, Input, int, Any]], out: BatchOutput, n: int, t0: float) -> None:
        self.core.apply([(m, inp, at) for m, inp, at, _ in ready], self, out)
        self._produce(out)
        await self.output.flush()
        if self.end_marker and out.writes:
            for p in out.writes:  # a batch of its own (see Settings.changelog_end_marker)
                self.output.produce(self.changelog, b"1", key=END_MARKER, partition=p)
            await self.output.flush()
        self._write(out)
        for m, _, _, ev in ready:
            if m.topic in self.aligner.event_topics:
                ev.ack()  # durable now: the offset may be committed
        self._account(out, n, t0)

    async def _position(self, topic: str, partition: int) -> int | None:
        read = self.aligner.read_upto.get((topic, partition))
        if read is not None:
            return read
        if (topic, partition) in self._positions:  # nothing delivered since: still the same
            return self._positions[(topic, partition)]
        try:
            pos: int | None = await self.app.consumer.position(TP(topic, partition))
        except Exception:  # not assigned (any more)
            return None
        self._positions[(topic, partition)] = pos
        return pos

    async def _lag_map(self, partitions: Iterable[int]) -> dict[tuple[str, int], bool]:
        """(topic, partition) -> offsets left to read (per the fetch high watermark)."""
        consumer, out = self.app.consumer, {}
        for p in partitions:
            for topic in self.event_inputs:
                try:
                    highwater = consumer.highwater(TP(topic, p))
                except Exception:
                    highwater = None
                position = await self._position(topic, p)
                # unknown (just assigned, no fetch answer yet) counts as lagging: hold rather than guess
                out[(topic, p)] = highwater is None or position is None or position < highwater
        return out

    async def _lagging(self) -> Callable[[str, int], bool]:
        lag = await self._lag_map(list(self.aligner.bufs))
        return lambda topic, p: lag.get((topic, p), False)

    def _produce(self, out: BatchOutput) -> None:
        for p, writes in out.writes.items():
            for key, value in writes:
                self.output.produce(self.changelog, value, key=key, partition=p)
        for r in out.records:
            self.output.produce(r.topic, r.value, key=r.key, headers=r.headers, partition=r.partition)

    def _write(self, out: BatchOutput) -> None:
        for p, writes in out.writes.items():
            wb = WriteBatch(raw_mode=True)
            for key, value in writes:
                if value is None:
                    wb.delete(key)
                else:
                    wb.put(key, value)
            self._db(p).write(wb)

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
        for c in out.counts:
            metrics.count(c.kind, c.journey, c.detail)
            if c.kind == "sent":
                metrics.SENDS.labels(c.detail, c.journey).inc()
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
        for tp, ts in out.max_ts.items():
            self.newest[tp] = max(self.newest.get(tp, ts), ts)
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

    async def on_revoked(self, sender: Any = None, revoked: Any = (), **_: Any) -> None:
        self._rebalance_started = time.monotonic()
        gone = {tp.partition for tp in revoked if tp.topic == self.topics.ticks}
        self._positions.clear()
        self.aligner.drop(gone)  # not acked: the partitions' new owner reads them again
        for key in [k for k in self.newest if k[1] in gone]:
            del self.newest[key]
        self.scanner.revoke(gone)

    async def gates(self) -> dict[int, float]:
        """Event-time gate of each active partition: see agents.timers.event_time_gate."""
        partitions = self.scanner.partitions
        lag = await self._lag_map(partitions)
        out = {}
        for p in partitions:
            inputs = [(lag[(t, p)] or self.aligner.holding(t, p), self.newest.get((t, p))) for t in self.event_inputs]
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
                    (Message(self.topics.ticks, p, -1, user.encode(), None, None), Tick(user), at, None)
                    for p, at, user in due
                ]
                await self._apply(ticks, BatchOutput(), 0, time.perf_counter())


def build_app(
    *,
    app_id: str,
    bootstrap: str,
    data_dir: str,
    partitions: int,
    journeys: JourneySet,
    topics: Topics,
    decoder: Decoder,
    batch_max: int = 1000,
    batch_within_ms: int = 50,
    timer_interval_ms: int = 200,
    grace_ms: int = 0,
    fire_limit: int = 2000,
    session_timeout_s: float = 10,
    heartbeat_s: float = 2,
    rebalance_timeout_s: float = 10,
    block_cache_mb: int = 32,
    write_buffer_mb: int = 16,
    changelog_end_marker: bool = False,
) -> tuple[faust.App, Runtime]:
    app = faust.App(
        app_id,
        broker=f"kafka://{bootstrap}",
        store="rocksdb://",
        datadir=data_dir,
        topic_partitions=partitions,
        consumer_auto_offset_reset="earliest",
        web_enabled=False,
        producer_linger_ms=5,
        broker_session_timeout=session_timeout_s,
        broker_heartbeat_interval=heartbeat_s,
        broker_rebalance_timeout=rebalance_timeout_s,
        topic_allow_declare=True,
    )
    table = app.Table(
        TABLE,
        partitions=partitions,
        key_type=bytes,
        value_type=bytes,
        options={
            "driver": "rocksdict",
            "block_cache_size": block_cache_mb * 2**20,
            # bounded memtables: memory per partition stays ~2 x write_buffer_mb + the block cache
            "write_buffer_size": write_buffer_mb * 2**20,
            "max_write_buffer_number": 2,
        },
        help="per-user journey state and the timer index",
    )
    source = app.topic(*topics.inputs, key_serializer="raw", value_serializer="raw", partitions=partitions)
    output = Output(bootstrap)
    runtime = Runtime(app, table, journeys, topics, output, decoder, grace_ms, fire_limit)
    runtime.end_marker = changelog_end_marker

    async def journeys_agent(stream: Any) -> None:
        async for events in stream.take_events(batch_max, within=batch_within_ms / 1000):
            await runtime.process(events)

    app.agent(source, name="journeys")(journeys_agent)
    app.timer(timer_interval_ms / 1000, name="fire_timers")(_timer_task(runtime))
    table.on_recover(runtime.on_recovered)
    app.on_partitions_revoked.connect(runtime.on_revoked)
    return app, runtime


def _timer_task(runtime: Runtime) -> Any:
    async def fire_timers() -> None:
        await runtime.scan()

    return fire_timers
