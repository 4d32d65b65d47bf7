"""The loop every channel-side process runs: consume a batch, handle it, flush, commit.

Senders and the call runner differ only in what they do with a batch (`handle`). Offsets are
committed after the batch's work is done and whatever it produced is flushed, so a crash replays
the batch; the durable set of started and finished keys (`DoneKeys`) makes the replay a no-op.

The keys live in RocksDB, and every change is also journaled to a compacted keys topic
(`nudgeflow.keys.<what>`) in the partition of the message it is about. When a replica is
assigned a partition, it first reads that partition of the keys topic (from where it last read it)
into its RocksDB: a partition that moves between replicas (a crash, a scale-up) moves with what
was delivered, and with what was started and never finished.
"""

from __future__ import annotations

import asyncio
import logging
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from pathlib import Path
from typing import Any

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, TopicPartition
from rocksdict import Options, Rdict

from nudgeflow.broker import Target, client_conf
from nudgeflow.channels.clients import channel_consumer, feedback_producer, ok_messages
from nudgeflow.engine.errors import NudgeflowError


class DoneKeys:
    """Idempotency keys started and finished (delivered, answered, given up), in RocksDB so they
    survive restarts. Values: `i:<epoch ms>` started, `d:<epoch ms>` done. Keys older than `ttl_s`
    are forgotten by `purge` (requests that old are expired anyway: README "Send requests")."""

    def __init__(
        self,
        path: Path,
        ttl_s: float = 7 * 86400,
        clock: Callable[[], float] = time.time,
        journal: Callable[[int, bytes, bytes], None] | None = None,
    ) -> None:
        path.mkdir(parents=True, exist_ok=True)
        self.db = Rdict(str(path), Options(raw_mode=True))
        self.ttl_s, self.clock = ttl_s, clock
        self.journal = journal  # (partition, key, value): to the keys topic

    def _stamp(self, kind: bytes) -> bytes:
        return kind + b":%d" % int(self.clock() * 1000)

    def __contains__(self, key: str) -> bool:
        v = self.db.get(key.encode())
        return v is not None and (v[:1] == b"d" or v == b"1")  # b"1": written by nudgeflow 0.1

    def _put(self, key: str, value: bytes, partition: int | None) -> None:
        k = key.encode()
        self.db.put(k, value)
        if self.journal is not None and partition is not None:
            self.journal(partition, k, value)

    def add(self, key: str, partition: int | None = None) -> None:
        self._put(key, self._stamp(b"d"), partition)

    def begin(self, key: str, partition: int | None = None) -> None:
        """Mark a key as started but not finished (a crash now leaves it so: see `started`)."""
        self._put(key, self._stamp(b"i"), partition)

    def merge(self, records: list[tuple[bytes, bytes | None]], partition: int, offset: int) -> None:
        """Keys read from the keys topic (a finished mark wins over a started one), and how far."""
        for k, v in records:
            if v is None:
                continue
            if v[:1] == b"i" and (old := self.db.get(k)) is not None and old[:1] == b"d":
                continue
            self.db.put(k, v)
        self.db.put(b"\0offset:%d" % partition, b"%d" % offset)

    def read_upto(self, partition: int) -> int | None:
        raw = self.db.get(b"\0offset:%d" % partition)
        return int(raw) if raw is not None else None

    def started(self, key: str) -> bool:
        """Begun before and never finished: the process stopped in the middle of it."""
        v = self.db.get(key.encode())
        return v is not None and v[:1] == b"i"

    def purge(self) -> int:
        """Forget keys older than the TTL; how many."""
        horizon = int((self.clock() - self.ttl_s) * 1000)
        old = []
        for k, v in self.db.items():
            if not isinstance(k, bytes) or not isinstance(v, bytes) or k[:1] == b"\0":
                continue
            stamp = v[2:] if len(v) > 2 and v[1:2] == b":" else b""
            if stamp.isdigit() and int(stamp) < horizon:
                old.append(k)
        for k in old:
            self.db.delete(k)
        return len(old)

    def close(self) -> None:
        self.db.close()


def load_keys(
    conf: dict[str, Any], topic: str, partitions: list[int], keys: DoneKeys, timeout: float = 60.0
) -> dict[int, int]:
    """Read keys-topic partitions, each from where `keys` last read it to its end, into `keys`
    (one reader for all of them); the records read per partition."""
    reader = Consumer(
        {
            **conf,
            "group.id": f"{topic}-reader",
            "enable.auto.commit": False,
            "enable.partition.eof": True,
            "log_level": 3,
        }
    )
    starts = {p: keys.read_upto(p) for p in partitions}
    read, ended = dict.fromkeys(partitions, 0), set()
    deadline = time.monotonic() + timeout
    try:
        reader.assign(
            [TopicPartition(topic, p, s + 1 if s is not None else OFFSET_BEGINNING) for p, s in starts.items()]
        )
        while time.monotonic() < deadline:
            batches: dict[int, list[tuple[bytes, bytes | None]]] = {}
            last: dict[int, int] = {}
            for m in reader.consume(10_000, 0.5):
                p = m.partition()
                if m.error() is not None:
                    if m.error().code() == KafkaError._PARTITION_EOF:
                        ended.add(p)
                        continue
                    raise NudgeflowError(f"cannot read {topic}[{p}]: {m.error()}")
                batches.setdefault(p, []).append((m.key(), m.value()))
                last[p] = m.offset()
            for p, batch in batches.items():
                keys.merge(batch, p, last[p])
                read[p] += len(batch)
            if len(ended) == len(partitions):
                return read
        raise NudgeflowError(f"no end of {topic} {sorted(set(partitions) - ended)} within {timeout:.0f}s")
    finally:
        reader.close()


class BatchConsumer(ABC):
    batch_max = 500

    def __init__(
        self,
        bootstrap: Target,
        topic: str,
        group: str,
        keys_dir: Path,
        session_timeout_ms: int,
        log: logging.Logger,
        keys_topic: str | None = None,
    ) -> None:
        self.topic, self.log, self.keys_topic = topic, log, keys_topic
        self.conf = client_conf(bootstrap)
        self.consumer = channel_consumer(bootstrap, group, session_timeout_ms)
        self.producer = feedback_producer(bootstrap)
        journal = None
        if keys_topic is not None:

            def journal(p: int, k: bytes, v: bytes) -> None:
                self.producer.produce(keys_topic, v, k, p)

        self.keys = DoneKeys(keys_dir, journal=journal)
        self._stop = False

    def _assigned(self, consumer: Any, partitions: list[Any]) -> None:
        """Before consuming a partition: what replicas before this one started and finished there."""
        if self.keys_topic is None or not partitions:
            return
        read = load_keys(self.conf, self.keys_topic, [tp.partition for tp in partitions], self.keys)
        for p, n in sorted(read.items()):
            if n:
                self.log.info("partition %d: %d key record(s) read from %s", p, n, self.keys_topic)

    def stop(self) -> None:
        """Stop after the current batch (signal handlers call this)."""
        self._stop = True

    @abstractmethod
    async def handle(self, msgs: list[Any]) -> None:
        """Do the work of one batch of (error-free) messages."""

    async def close(self) -> None:  # noqa: B027 - optional hook, most subclasses hold something
        """Release what the subclass holds (providers, clients)."""

    async def run(self, idle_exit_s: float | None = None) -> None:
        self.consumer.subscribe([self.topic], on_assign=self._assigned)
        loop = asyncio.get_running_loop()
        idle = 0.0
        purged_at = 0.0
        try:
            while not self._stop:
                if time.monotonic() - purged_at > 3600:  # forget keys past their TTL, hourly
                    purged_at = time.monotonic()
                    gone = await loop.run_in_executor(None, self.keys.purge)
                    if gone:
                        self.log.info("forgot %d idempotency key(s) older than %.0f s", gone, self.keys.ttl_s)
                msgs = await loop.run_in_executor(None, self.consumer.consume, self.batch_max, 0.5)
                if not msgs:
                    idle += 0.5
                    if idle_exit_s is not None and idle >= idle_exit_s:
                        return
                    continue
                idle = 0.0
                ok = list(ok_messages(msgs, self.log))
                if not ok:
                    continue
                await self.handle(ok)
                self.producer.flush(30)
                self.consumer.commit(asynchronous=False)
        finally:
            self.consumer.close()
            self.keys.close()
            await self.close()
