"""Reading the input topics: a confluent-kafka consumer that hands over whole fetches.

Faust's consumer delivers one message at a time (tasks, queues and acknowledgements per
message: about three quarters of a worker's time at volume). The input topics are read here
instead, by a plain confluent-kafka consumer that is *assigned* (never subscribed) the partitions
Faust's group gave this worker, at the positions stored with the state (`agents.keys`): librdkafka
fetches in its own threads, and `poll` returns up to a batch of messages at once. Where each
input resumes is part of the state (written in the same batch as the records it led to), so no
offset commit is needed to resume correctly; the pipeline also commits positions to the consumer
group `<app_id>-inputs` for lag tooling (kafka-consumer-groups, Burrow).

Partition-EOF events tell the aligner when a topic-partition has been read to its end.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable, Mapping
from typing import Any

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, TopicPartition

from nudgeflow.agents.align import Aligner

log = logging.getLogger("nudgeflow.worker")


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
            }
        )
        self.assigned: list[TopicPartition] = []
        self.errors = 0
        self._ends: list[tuple[str, int, int]] = []
        aligner.high_watermark = self.high_watermark
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
