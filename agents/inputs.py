"""Reading the input topics: a confluent-kafka consumer that hands over whole fetches.

Faust's consumer delivers one message at a time (tasks, queues and acknowledgements per
message: about three quarters of a worker's time at volume). The input topics are read here
instead, by a plain confluent-kafka consumer that is *assigned* (never subscribed) the partitions
Faust's group gave this worker, at the positions stored with the state (`agents.keys`): librdkafka
fetches in its own threads, and `poll` returns up to a batch of messages at once. Where each
input resumes is part of the state (written in the same batch as the records it led to), so no
offset commit is needed to resume correctly; the pipeline also commits positions to the consumer
group `<app_id>-inputs` for lag tooling (kafka-consumer-groups, Burrow).

Partition-EOF events tell the aligner when a topic-partition has been read to its end, and
librdkafka's statistics (every `STATS_MS`) when each partition's leader last answered a fetch:
a quiet topic holds timers back to that time (agents.align), so a broker that stops answering
(frozen, partitioned away) stops the timers of its partitions instead of leaving them to the
wall clock.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable, Mapping
from typing import Any

import orjson
from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, TopicPartition

from nudgeflow.agents.align import Aligner

log = logging.getLogger("nudgeflow.worker")

STATS_MS = 250  # librdkafka statistics interval: how often the leaders' last answers are learnt
# a leader is answering while its last response is younger than this (an idle fetch is answered
# every fetch.wait.max.ms, 500 ms by default; room for a loaded machine)
ANSWERING_MS = 1500


class InputReader:
    def __init__(self, client_conf: dict[str, Any], group: str, max_fetch_bytes: int, aligner: Aligner) -> None:
        self.aligner = aligner
        self.consumer = Consumer(
            {
                **client_conf,
                "group.id": group,
                "enable.auto.commit": False,
                "enable.auto.offset.store": False,
                "enable.partition.eof": True,
                "auto.offset.reset": "earliest",
                # librdkafka returns a record batch larger than these limits anyway (so nothing is
                # skipped unseen); per partition they keep one topic from flooding the aligner
                "max.partition.fetch.bytes": 2**20,
                "fetch.max.bytes": max_fetch_bytes,
                "queued.max.messages.kbytes": 65536,
                "log_level": 3,
                "statistics.interval.ms": STATS_MS,
                "stats_cb": self._on_stats,
            }
        )
        self.assigned: list[TopicPartition] = []
        # topic-partition -> (its leader answering since, its last answer), epoch ms
        self._heard: dict[tuple[str, int], tuple[float, float]] = {}
        self._since: dict[str, float] = {}  # broker -> answering without a gap since (epoch ms)
        self._gaps: set[str] = set()  # brokers seen silent with a request waiting, at least once
        self._created = time.time() * 1000
        self.errors = 0
        self._ends: list[tuple[str, int, int]] = []
        aligner.high_watermark = self.high_watermark
        aligner.heard = self.heard
        self._last_error_log = 0.0

    def assign(self, positions: Mapping[tuple[str, int], int | None]) -> None:
        """Read these topic-partitions from these offsets (None: from the beginning)."""
        tps = [TopicPartition(t, p, OFFSET_BEGINNING if off is None else off) for (t, p), off in positions.items()]
        self.consumer.assign(tps)
        self.assigned = tps
        self.aligner.track({p for _, p in positions}, {t for t, _ in positions})

    def pause(self, tps: list[tuple[str, int]]) -> None:
        """Stop fetching these (librdkafka drops what it prefetched and resumes after the last
        message handed over)."""
        if tps:
            self.consumer.pause([TopicPartition(t, p) for t, p in tps])

    def resume(self, tps: list[tuple[str, int]]) -> None:
        if tps:
            self.consumer.resume([TopicPartition(t, p) for t, p in tps])

    def unassign(self) -> None:
        if self.assigned:
            self.consumer.unassign()
            self.assigned = []
        self._ends = []

    def committed(self, tps: Iterable[tuple[str, int]], group_conf: dict[str, Any]) -> dict[tuple[str, int], int]:
        """Offsets committed in another consumer group (nudgeflow 0.1 committed input offsets in
        Faust's group): where to start when no position is stored yet."""
        c = Consumer({**group_conf, "enable.auto.commit": False, "log_level": 3})
        try:
            got = c.committed([TopicPartition(t, p) for t, p in tps], timeout=30)
        finally:
            c.close()
        return {(tp.topic, tp.partition): tp.offset for tp in got if tp.offset >= 0}

    def poll(self, max_messages: int, timeout: float = 0.0) -> list[Any]:
        """Up to `max_messages` messages already fetched (waiting up to `timeout` for the first)."""
        got = self.consumer.consume(max_messages, timeout)
        return self._sort(got) if got else got

    async def poll_wait(self, max_messages: int, timeout: float) -> list[Any]:
        """Like poll, but waits for messages in a thread (the event loop stays free)."""
        loop = asyncio.get_running_loop()
        got = await loop.run_in_executor(None, self.consumer.consume, max_messages, timeout)
        return self._sort(got) if got else got

    def _sort(self, got: list[Any]) -> list[Any]:
        """The messages; EOF events are kept for `ends`, errors logged (rate-limited) and counted."""
        out = []
        for m in got:
            err = m.error()
            if err is None:
                out.append(m)
            elif err.code() == KafkaError._PARTITION_EOF:
                self._ends.append((m.topic(), m.partition(), m.offset()))
            else:
                self.errors += 1
                now = time.monotonic()
                if now - self._last_error_log > 10:
                    self._last_error_log = now
                    log.warning("input consumer error: %s", err)
        return out

    def ends(self) -> list[tuple[str, int, int]]:
        """The partition-EOF events of the fetches polled since the last call: note them after the
        messages of the same fetches (an EOF may come before or after a message in one poll)."""
        ends, self._ends = self._ends, []
        return ends

    def commit(self, positions: Mapping[tuple[str, int], int]) -> None:
        """Record positions in the consumer group, for lag tools (asynchronously, best effort)."""
        if positions:
            try:
                self.consumer.commit(
                    offsets=[TopicPartition(t, p, off) for (t, p), off in positions.items()], asynchronous=True
                )
            except Exception as e:  # informational only: where to resume is in the state store
                log.debug("position commit failed: %s", e)

    def _on_stats(self, raw: str) -> None:
        """librdkafka's statistics (served by consume): when each assigned partition's leader last
        answered (`rxidle`: microseconds since the broker's last response, as of `ts`)."""
        now_wall, now_mono = time.time() * 1000, time.monotonic()
        try:
            doc = orjson.loads(raw)
            brokers, ts = doc["brokers"], doc["ts"]
        except (orjson.JSONDecodeError, KeyError, TypeError):
            return
        # when the statistics were taken: librdkafka's clock is CLOCK_MONOTONIC (µs) on Linux, as
        # Python's monotonic; statistics queued while the loop did not poll are older than now
        age_ms = (now_mono - ts / 1e6) * 1000
        taken = now_wall - age_ms if 0 <= age_ms < 60_000 else now_wall
        heard: dict[tuple[str, int], tuple[float, float]] = {}
        for name, b in brokers.items():
            toppars, idle = b.get("toppars") or {}, b.get("rxidle", -1)
            # silent: a request has waited too long for its answer (with none waiting, nothing was
            # asked, e.g. the fetch queue is full while the loop is busy: that silence means nothing)
            waiting = b.get("waitresp_cnt", 0) > 0 or b.get("outbuf_cnt", 0) > 0
            if (
                b.get("nodeid", -1) < 0
                or b.get("state") != "UP"
                or idle < 0
                or (idle > ANSWERING_MS * 1000 and waiting)
            ):
                if self._since.pop(name, None) is not None:
                    self._gaps.add(name)
                continue
            last = taken - idle / 1000
            since = self._since.get(name)
            if since is None:  # answering since it was first asked, unless it has been silent since
                since = self._since[name] = last if name in self._gaps else self._created
            for tp in toppars.values():
                heard[(tp["topic"], tp["partition"])] = (since, last)
        self._heard = heard

    def heard(self, topic: str, partition: int) -> tuple[float, float] | None:
        """(answering without a gap since, last answer), epoch ms, of the partition's leader per the
        latest statistics; None when it is not answering or that is not known yet."""
        return self._heard.get((topic, partition))

    def high_watermark(self, topic: str, partition: int) -> int | None:
        """The end of a topic-partition per the latest fetch answer (None: not known yet)."""
        try:
            _, high = self.consumer.get_watermark_offsets(TopicPartition(topic, partition), cached=True)
        except Exception:  # not assigned (any more)
            return None
        return high if high >= 0 else None

    def high_watermarks(self) -> dict[tuple[str, int], int]:
        """The high watermark of each assigned input from the latest fetch (not ListOffsets)."""
        out = {}
        for tp in self.assigned:
            try:
                _, high = self.consumer.get_watermark_offsets(tp, cached=True)
            # not fetched yet: no watermark to report, nothing to lose
            except Exception:  # nosec B112
                continue
            if high >= 0:
                out[(tp.topic, tp.partition)] = high
        return out

    def close(self) -> None:
        self.consumer.close()
