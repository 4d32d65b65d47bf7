"""The worker's hot path: read inputs, order them, apply them, make the results durable.

One loop does everything that touches user state, so nothing needs a lock:

    read a fetch of input messages (agents.inputs)      decode, dead-letter the bad ones
    hold / release them in event-time order (align)      take the due timers (timers)
    apply the released inputs and ticks (batch)          -> records, sends, positions
    wait until what was produced before is delivered (and write a checkpoint that was)
    produce this batch's send requests, calls and dead letters; keep its state changes in the
    current checkpoint; every CHECKPOINT_MS (or when the input runs dry) produce the checkpoint's
    changelog records, and go round again

so what was produced is always in flight while the next batch is computed. Send requests leave
with their batch (a batch's latency is not the checkpoint's); state is made durable a checkpoint
at a time, which spans batches: a user active in several batches of one checkpoint is written to
RocksDB and the changelog once, not once per batch (Quix Streams' checkpoint does the same). A batch
is counted in the metrics once what it produced is delivered; only when everything a checkpoint
covers is acknowledged, its own changelog records and its batches' outputs, is it written to the
store with the input positions it reached. Nothing is acknowledged that is not durable: after a crash the inputs
are read again from the stored positions, the per-user offsets make the durable part of the
replay a no-op, and the send requests of the batches after the last checkpoint are produced
again with the same idempotency keys, which senders deliver once.

Rebalances: when Faust revokes partitions the loop stops at a safe point (what was computed made
durable, or abandoned if it cannot be within the rebalance timeout; a batch computed meanwhile dropped),
and everything in memory is forgotten. When Faust has assigned partitions (and, with nudgeflow's
Recovery, "recovered" them at once), `assign` restores each partition's store from its changelog
in bulk (agents.restore), seeks the inputs to their stored positions and starts again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson
from mode import Service

from nudgeflow.agents import metrics
from nudgeflow.agents.align import Aligner
from nudgeflow.agents.batch import BatchCore, BatchOutput, Item, Write, upgrade_record
from nudgeflow.agents.inputs import InputReader
from nudgeflow.agents.keys import USER, position_key
from nudgeflow.agents.members import MemberScanner
from nudgeflow.agents.occupancy import OCCUPANCY
from nudgeflow.agents.output import DeliveryError, Output
from nudgeflow.agents.owners import GEN_HEADER, claim, read_owners, tainted
from nudgeflow.agents.restore import restore_partitions
from nudgeflow.agents.store import StateStore
from nudgeflow.agents.timers import TimerScanner
from nudgeflow.engine.io import MemberCheck, Tick
from nudgeflow.streams.topics import Topics

log = logging.getLogger("nudgeflow.worker")


@dataclass
class PipelineConfig:
    batch_max: int
    batch_within_ms: int
    timer_interval_ms: int
    checkpoint_ms: int
    revoke_timeout_s: float
    client_conf: dict[str, Any]
    app_id: str
    owners_topic: str  # agents/owners.py


@dataclass
class Applied:
    """A batch applied and produced: its output (counted once delivered), the input messages it
    read, when it started and when its records were delivered."""

    out: BatchOutput
    n: int
    t0: float
    delivered_at: float = 0.0
    seconds: float = 0.0


@dataclass
class Checkpoint:
    """The state changes of the batches applied since the last checkpoint, the newest per key:
    written to the changelog and RocksDB together, with the input positions they reached."""

    started: float = field(default_factory=time.monotonic)
    writes: dict[int, dict[bytes, bytes | None]] = field(default_factory=dict)  # changelog and store
    local: dict[int, dict[bytes, bytes | None]] = field(default_factory=dict)  # store only: the timer index
    positions: dict[tuple[str, int], int] = field(default_factory=dict)
    batches: int = 0
    records: dict[tuple[int, str], bytes] = field(default_factory=dict)  # the user records written (batch core)
    born: dict[int, set[bytes]] = field(default_factory=dict)  # timer keys set first in this checkpoint

    def absorb(self, out: BatchOutput) -> None:
        """A batch's state changes into the checkpoint (a later batch's value of a key wins).

        Timer-index entries set and cleared again within the checkpoint net out: a user has one
        entry (their next wake-up), so a key whose first change here is a set was in no earlier
        checkpoint or the store, and its clearing leaves nothing to write. A cart restarted every
        few seconds moves its user's entry a dozen times in a five-second checkpoint: two writes
        instead of twenty-four (the entry the store had goes, the newest comes)."""
        for p, ops in out.writes.items():
            d = self.writes.get(p)
            if d is None:
                d = self.writes[p] = {}
            d.update(ops)
        for p, ops in out.local.items():
            d, born = self.local.setdefault(p, {}), self.born.setdefault(p, set())
            for key, value in ops:
                if value is None and key in born:
                    born.discard(key)
                    del d[key]
                    continue
                if value is not None and key not in d:
                    born.add(key)
                d[key] = value
        self.positions.update(out.positions)
        out.writes, out.local = {}, {}

    def close(self) -> None:
        """Order the changelog records as a batch would: the user records first, then what
        describes them (the step counts, member-scan cursors), the input positions last. A
        changelog cut short by a crash then restores records without the counts, cursors and
        positions past them, never the other way round."""
        for changes in self.writes.values():
            after = [k for k in changes if not k.startswith(USER)]  # maybe first written by an earlier batch
            changes.update([(k, changes.pop(k)) for k in after])
        for (topic, p), pos in self.positions.items():
            d = self.writes.get(p)
            if d is None:
                d = self.writes[p] = {}
            d[position_key(topic)] = b"%d" % pos


def _lists(changes: dict[int, dict[bytes, bytes | None]]) -> dict[int, list[Write]]:
    return {p: list(d.items()) for p, d in changes.items()}


class Pipeline(Service):
    """The loop above, started and stopped with the Faust app."""

    def __init__(
        self,
        core: BatchCore,
        store: StateStore,
        reader: InputReader,
        output: Output,
        scanner: TimerScanner,
        aligner: Aligner,
        topics: Topics,
        changelog: str,
        cfg: PipelineConfig,
        members: MemberScanner | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.core, self.store, self.reader, self.output = core, store, reader, output
        self.scanner, self.aligner, self.topics, self.changelog, self.cfg = scanner, aligner, topics, changelog, cfg
        self.members = members
        self.inputs = [*topics.user_inputs, topics.feedback]  # read by this loop (ticks: Faust's)
        self.partitions: list[int] = []
        self.ready = False  # partitions assigned and restored
        self.beat = time.monotonic()  # the loop turned (agents/health.py: liveness)
        self.ended = False  # the loop ended without being asked to
        self._pause = False  # a rebalance or a stop asked the loop to stand still
        self._paused = asyncio.Event()
        self._unsettled: list[Applied] = []  # produced, delivery not yet confirmed
        self._acc = self._new_checkpoint()  # the batches since the last checkpoint
        self._inflight: Checkpoint | None = None  # its changelog records produced, not yet written
        self._assigned_at = 0.0
        self._last_scan = self._last_lag = self._last_users = 0.0
        self._users_labels: set[tuple[str, str]] = set()
        self._wake = asyncio.Event()
        self.gen_headers: dict[int, list[tuple[str, bytes]]] = {}  # per partition: this owner's generation

    # --- lifecycle ------------------------------------------------------------------------------

    async def on_start(self) -> None:
        self.add_future(self._run())

    async def on_stop(self) -> None:
        await self.quiesce()
        self.reader.close()
        self.output.close()

    async def quiesce(self) -> None:
        """Stop at a safe point and forget everything in memory (a revoke, a stop)."""
        self._pause, self.ready = True, False
        self._wake.set()
        try:
            await asyncio.wait_for(self._paused.wait(), self.cfg.revoke_timeout_s)
        except TimeoutError:
            log.warning("what was computed could not be made durable in time: abandoned (its inputs are read again)")
        self._forget()
        self.partitions = []

    def _new_checkpoint(self) -> Checkpoint:
        ck = Checkpoint()
        self.scanner.unwritten.append(ck.local)  # due timers are found in it until it is written
        return ck

    def _forget(self) -> None:
        self._inflight = None
        self._unsettled = []
        self.scanner.unwritten.clear()
        self._acc = self._new_checkpoint()
        self.reader.unassign()
        self.aligner.reset()
        self.core.forget()
        self.scanner.revoke(set(self.scanner.partitions))
        if self.members is not None:
            self.members.revoke(set(self.members.cursor))

    async def assign(self, partitions: Sequence[int]) -> None:
        """Faust assigned these partitions: restore them, seek the inputs, start."""
        metrics.REBALANCES.inc()
        metrics.ASSIGNED.set(len(partitions))
        await self.quiesce()
        if partitions:
            await self._start(partitions)

    async def _start(self, partitions: Sequence[int]) -> None:
        t0 = time.monotonic()
        loop = asyncio.get_running_loop()
        total = 0

        def progress(p: int, records: int, remaining: int | None) -> None:  # (from the restore's thread)
            self.beat = time.monotonic()
            if remaining is not None:
                metrics.RESTORE_REMAINING.labels(str(p)).set(remaining)

        local_gens, wipe = await loop.run_in_executor(None, self._claim, sorted(partitions))
        restored = await loop.run_in_executor(
            None,
            lambda: restore_partitions(
                self.cfg.client_conf,
                self.changelog,
                sorted(partitions),
                self.store,
                progress=progress,
                gens=local_gens,
                from_start=wipe,
            ),
        )
        for done in restored:
            if done.fenced:
                log.warning(
                    "partition %d: %d changelog record(s) of a fenced-off owner skipped", done.partition, done.fenced
                )
            metrics.RESTORE_REMAINING.labels(str(done.partition)).set(0)
            total += done.records
            metrics.RESTORED_RECORDS.labels(str(done.partition)).set(done.records)
            if done.records:
                log.info(
                    "partition %d: %d changelog record(s) restored in %.1fs", done.partition, done.records, done.seconds
                )
        await loop.run_in_executor(None, self._load_occupancy, sorted(partitions))
        positions: dict[tuple[str, int], int | None] = {(t, p): None for t in self.inputs for p in partitions}
        stored = {(t, p): off for p in partitions for t, off in self.store.positions(p, self.inputs).items()}
        missing = [tp for tp in positions if tp not in stored]
        if missing:  # nudgeflow 0.1 kept input offsets in Faust's consumer group
            fallback = await loop.run_in_executor(
                None, lambda: self.reader.committed(missing, {**self.cfg.client_conf, "group.id": self.cfg.app_id})
            )
            positions.update(fallback)
        positions.update(stored)
        self.reader.assign(positions)
        self.scanner.assign(set(partitions))
        if self.members is not None:
            self.members.assign(set(partitions))
        self.partitions = sorted(partitions)
        self._assigned_at = time.time()
        metrics.RESTORE_SECONDS.set(time.monotonic() - t0)
        log.info(
            "active partitions %s; %d changelog record(s) restored; pending timers %s",
            self.partitions,
            total,
            dict(self.scanner.pending),
        )
        self._pause, self.ready = False, True
        self._paused.clear()
        self._wake.set()

    def _load_occupancy(self, partitions: list[int]) -> None:
        """Users per journey step of each partition: stored with the state (agents.occupancy), or
        counted once from the records of a store that predates it."""
        occupancy = self.core.occupancy
        for p in partitions:
            raw = self.store.get_many(p, [OCCUPANCY])[0]
            if raw is not None:
                occupancy.load(p, raw)
            else:
                states = (upgrade_record(orjson.loads(v))["state"] for v in self.store.values_from(p, USER))
                occupancy.census(p, states)
        self._users_gauge(force=True)

    def _users_gauge(self, force: bool = False) -> None:
        """nudgeflow_journey_users from the counts in memory (at most once a second)."""
        now = time.monotonic()
        if not force and now - self._last_users < 1.0:
            return
        self._last_users = now
        totals = self.core.occupancy.totals()
        for labels in self._users_labels - set(totals):
            metrics.JOURNEY_USERS.labels(*labels).set(0)
        for (journey, step), n in totals.items():
            metrics.JOURNEY_USERS.labels(journey, step).set(n)
        self._users_labels |= set(totals)

    def _claim(self, partitions: list[int]) -> tuple[dict[int, int], list[int]]:
        """Take ownership of the partitions (agents/owners.py): empty a local store that holds a
        fenced-off owner's writes, fence the partitions with new generations. Returns the
        generations the local stores were at (what their restore starts from) and the emptied."""
        cfg, store = self.cfg, self.store
        latest = read_owners(cfg.client_conf, cfg.owners_topic)
        local = {p: store.owner_gen(p) for p in partitions}
        wiped = []
        for p in partitions:
            if tainted(latest.get(p), local[p], store.changelog_offset(p)):
                log.warning(
                    "partition %d: the local store wrote after a newer owner took the partition over: "
                    "emptied and restored from the changelog",
                    p,
                )
                store.wipe(p)
                wiped.append(p)
                local[p] = None
        gens = claim(cfg.client_conf, cfg.owners_topic, self.changelog, partitions, latest, local)
        for p, gen in gens.items():
            store.set_owner_gen(p, gen)
        self.gen_headers = {p: [(GEN_HEADER, str(gen).encode())] for p, gen in gens.items()}
        return {p: g for p, g in local.items() if g is not None}, wiped

    # --- the loop -------------------------------------------------------------------------------

    async def _run(self) -> None:
        try:
            while not self.should_stop:
                self.beat = time.monotonic()
                if self._pause or not self.ready:
                    await self._stand_still()
                    continue
                try:
                    await self._step()
                except Exception:  # never leave the loop: log, forget what is in memory, go on
                    log.exception("batch failed; state is read again from the store")
                    partitions = list(self.partitions)
                    self._forget()
                    await asyncio.sleep(1.0)
                    await self._start(partitions)
        finally:  # stopping: what was computed is made durable (or given up), then stand still
            self.ended = not self.should_stop
            self._pause = True
            await self._flush()
            self._paused.set()

    async def _stand_still(self) -> None:
        await self._flush()
        self._paused.set()
        self._wake.clear()
        if self._pause or not self.ready:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), 1.0)

    async def _step(self) -> None:
        t0 = time.perf_counter()
        cfg, reader = self.cfg, self.reader
        msgs = reader.poll(cfg.batch_max, 0)
        if len(msgs) < cfg.batch_max:
            # a partial fetch (live traffic): gather more for up to BATCH_WITHIN_MS (while the batch
            # in flight is delivered), so the work per batch is spread over more events
            limit = min(cfg.batch_within_ms, cfg.timer_interval_ms) / 1000
            deadline = time.monotonic() + limit
            while len(msgs) < cfg.batch_max and (left := deadline - time.monotonic()) > 0 and not self._pause:
                more = await reader.poll_wait(cfg.batch_max - len(msgs), left)
                if not more and msgs:
                    break
                msgs += more
        if self._pause:
            return  # read but not applied: the positions say where to read again
        out = BatchOutput()
        items = self.core.decode(msgs, out)
        self.aligner.note_reads(out.read)
        self.aligner.note_times(out.dropped_upto)
        for topic, p, offset in reader.ends():
            self.aligner.note_end(topic, p, offset)
        aligner = self.aligner
        ready = aligner.add_all(items)
        ready += aligner.release()
        pause, resume = aligner.flow()
        reader.pause(pause)
        reader.resume(resume)
        now = time.time()
        scan_writes: dict[int, list[tuple[bytes, bytes | None]]] = {}
        if now - self._last_scan >= cfg.timer_interval_ms / 1000:
            self._last_scan = now
            ready += self._due_ticks(now)
            if self.members is not None and self.members.active:
                checks, scan_writes = self.members.collect(int(now * 1000), aligner.gate)
                ready += [Item(self.topics.ticks, p, -1, MemberCheck(u, jid), at) for p, u, jid, at in checks]
        if now - self._last_lag >= 1.0:
            self._last_lag = now
            self._consumer_lag()
        self.core.apply(ready, self.store, out)
        for p, cursor in scan_writes.items():  # durable with the checks they made
            out.writes.setdefault(p, []).extend(cursor)
        self._positions(out)
        await self._settle()
        if self._pause:
            return  # computed on top of what may be forgotten: dropped (the positions say where to read again)
        if msgs or ready:
            self._produce(out)
            self._unsettled.append(Applied(out, len(msgs), t0))
            self._absorb(out)
        acc = self._acc
        if acc.batches and (not msgs or time.monotonic() - acc.started >= cfg.checkpoint_ms / 1000):
            self._checkpoint()  # due, or the input ran dry: nothing to gain by waiting

    def _due_ticks(self, now: float) -> list[Item]:
        aligner, ticks_topic = self.aligner, self.topics.ticks
        gates = {p: aligner.gate(p) for p in self.scanner.partitions}
        for p, gate in gates.items():
            if gate == float("inf"):
                lag = 0.0  # every input quiet: timers follow the wall clock
            elif gate == float("-inf"):
                lag = now - self._assigned_at  # an input not read yet: held since the assignment
            else:
                lag = max(0.0, now - gate / 1000)
            metrics.EVENT_TIME_LAG.labels(str(p)).set(lag)
        due = self.scanner.collect_due(int(now * 1000), lambda p: gates.get(p, float("-inf")))
        return [Item(ticks_topic, p, -1, Tick(user), at) for p, at, user in due]

    def _consumer_lag(self) -> None:
        """Per input partition: messages between where a restart would resume (the stored position,
        or what this batch makes durable) and the latest fetch's high watermark."""
        aligner = self.aligner
        for (topic, p), high in self.reader.high_watermarks().items():
            pos = aligner.position(topic, p)
            if pos is not None:
                metrics.CONSUMER_LAG.labels(self.topics.base(topic), str(p)).set(max(0, high - pos))

    def _positions(self, out: BatchOutput) -> None:
        """Where each input read in this batch resumes once the batch is durable."""
        aligner = self.aligner
        for topic, p in out.read:
            pos = aligner.position(topic, p)
            if pos is not None:
                out.positions[(topic, p)] = pos

    def _absorb(self, out: BatchOutput) -> None:
        """A produced batch's state changes into the current checkpoint; the timers it set or
        cleared count (and are found by the scanner) at once."""
        acc = self._acc
        acc.absorb(out)
        acc.batches += 1
        self.core.fold(acc.records, out)
        scanner = self.scanner
        for p in set(out.timers_set) | set(out.timers_cleared):
            scanner.applied(p, out.timers_set.get(p, 0), out.timers_cleared.get(p, 0))
        for p, due in out.earliest_timer.items():
            scanner.rewind(p, due)

    def _checkpoint(self) -> None:
        """Close the current checkpoint and produce its changelog records."""
        ck, self._acc = self._acc, self._new_checkpoint()
        ck.close()
        self._produce_checkpoint(ck)
        self._inflight = ck

    def _produce(self, out: BatchOutput) -> None:
        produce = self.output.produce
        for r in out.records:
            produce(r.topic, r.value, r.key, r.partition, r.headers)

    def _produce_checkpoint(self, ck: Checkpoint) -> None:
        output, changelog, gen_headers = self.output, self.changelog, self.gen_headers
        for p, writes in ck.writes.items():
            output.produce_many(changelog, writes.items(), p, gen_headers.get(p))

    def _produce_again(self) -> None:
        for a in self._unsettled:
            self._produce(a.out)
        if self._inflight is not None:
            self._produce_checkpoint(self._inflight)

    async def _settle(self) -> bool:
        """Wait until everything produced is delivered (producing it all again after a failure),
        count the batches delivered, then write the checkpoint in flight to the store. A rebalance or
        stop gives up on a failing delivery (False: quiesce forgets it all, its inputs are read
        again)."""
        if not self._unsettled and self._inflight is None:
            return True
        attempts = await self.output.deliver(
            self._produce_again, self._delivery_failed, should_stop=lambda: self._pause, produced=True
        )
        if attempts == 0:
            return False
        now, clock = time.time(), time.perf_counter()
        for a in self._unsettled:
            a.delivered_at, a.seconds = now, clock - a.t0
            self._account(a)
        self._unsettled = []
        ck = self._inflight
        if ck is not None:
            offsets, self.output.offsets = self.output.offsets, {}
            self.store.write(_lists(ck.writes), _lists(ck.local), offsets)
            self.scanner.unwritten[:] = [d for d in self.scanner.unwritten if d is not ck.local]
            self._inflight = None
            self.core.written_records(ck.records)
            self.reader.commit(ck.positions)
        return True

    async def _flush(self) -> None:
        """Make everything computed durable: what is in flight, then the current checkpoint."""
        if await self._settle() and self._acc.batches:
            self._checkpoint()
            await self._settle()

    def _delivery_failed(self, e: DeliveryError, retry_in: float) -> None:
        metrics.DELIVERY_FAILURES.inc()
        log.error("a batch's records could not be written (%s): inputs held, retrying in %.1fs", e, retry_in)

    def _account(self, a: Applied) -> None:
        """A batch's metrics, once everything it produced is delivered (what this process applied:
        inputs read again after a checkpoint was given up count again)."""
        out, n, now = a.out, a.n, a.delivered_at
        base = self.topics.base
        for topic, k in out.consumed.items():
            metrics.EVENTS.labels(base(topic)).inc(k)
        for topic, reason in out.invalid:
            metrics.INVALID.labels(base(topic), reason).inc()
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
        metrics.count_many(out.counts)
        self._users_gauge()
        for (channel, journey, step), k in out.sent_by.items():
            metrics.SENDS.labels(channel, journey, step).inc(k)
        metrics.observe_many(metrics.SEND_LATENCY, [max(0.0, now - created / 1000) for created in out.sent_at])
        lateness = [max(0.0, now - due / 1000) for _, due, stale in out.ticks if not stale]
        metrics.observe_many(metrics.TIMER_LATENESS, lateness)
        if len(lateness) < len(out.ticks):
            metrics.TIMERS_STALE.inc(len(out.ticks) - len(lateness))
        if lateness:
            metrics.TIMERS_FIRED.inc(len(lateness))
        if out.timers_cancelled:
            metrics.TIMERS_CANCELLED.inc(out.timers_cancelled)
        metrics.HELD_INPUTS.set(self.aligner.held)
        if n:
            metrics.BATCH_SIZE.observe(n)
        metrics.BATCH_SECONDS.observe(a.seconds)
