"""Producing with confluent-kafka: a whole batch of records, then one wait for all deliveries.

The pipeline produces a batch's changelog records and output records (send requests, calls,
dead letters) here and computes the next batch while librdkafka delivers them; `settle` then
waits (polling, without blocking the event loop) until every record is acknowledged or failed.
Idempotence keeps per-partition order, which the changelog relies on, and the delivery reports
give the changelog offset each partition's store has reached.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable
from typing import Any

from confluent_kafka import KafkaError, KafkaException, Producer

from nudgeflow.engine.errors import NudgeflowError


class DeliveryError(NudgeflowError):
    """Records could not be delivered; the batch is not acknowledged and will be produced again."""


class Output:
    def __init__(self, client_conf: dict[str, Any], track_topic: str | None = None) -> None:
        conf = {
            "enable.idempotence": True,
            "linger.ms": 5,
            "log_level": 3,
            "queue.buffering.max.messages": 1_000_000,
            "queue.buffering.max.kbytes": 1_048_576,
            **client_conf,
        }
        self.producer = Producer(conf)
        self.failed: list[KafkaError] = []
        self.track_topic = track_topic  # the changelog: its delivered offsets are kept per partition
        self.offsets: dict[int, int] = {}

    def _delivered(self, err: KafkaError | None, msg: Any) -> None:
        if err is not None:
            self.failed.append(err)

    def _tracked(self, err: KafkaError | None, msg: Any) -> None:
        if err is not None:
            self.failed.append(err)
            return
        p, off = msg.partition(), msg.offset()
        if off > self.offsets.get(p, -1):
            self.offsets[p] = off

    def produce(
        self,
        topic: str,
        value: bytes | None,
        key: bytes | None = None,
        partition: int | None = None,
        headers: list[tuple[str, bytes]] | None = None,
    ) -> None:
        cb = self._tracked if topic == self.track_topic else self._delivered
        produce = self.producer.produce
        part = -1 if partition is None else partition  # -1: the partitioner picks (RD_KAFKA_PARTITION_UA)
        while True:
            try:
                produce(topic, value, key, part, on_delivery=cb, headers=headers)
                return
            except BufferError:  # local queue full: let librdkafka drain it, then try again
                self.producer.poll(0.05)
            except KafkaException as e:
                raise DeliveryError(f"cannot produce to {topic}: {e}") from e

    def produce_many(
        self,
        topic: str,
        pairs: Iterable[tuple[bytes, bytes | None]],
        partition: int,
        headers: list[tuple[str, bytes]] | None = None,
    ) -> None:
        """`produce` of each (key, value) to one partition (a batch's changelog records), in order."""
        cb = self._tracked if topic == self.track_topic else self._delivered
        produce = self.producer.produce
        for key, value in pairs:
            try:
                produce(topic, value, key, partition, on_delivery=cb, headers=headers)
            except BufferError:  # local queue full: the one-by-one way waits for room
                self.produce(topic, value, key, partition, headers)
            except KafkaException as e:
                raise DeliveryError(f"cannot produce to {topic}: {e}") from e

    def _check(self) -> None:
        if self.failed:
            errs, self.failed = self.failed, []
            raise DeliveryError(f"{len(errs)} record(s) not delivered: {errs[0]}")

    def flush_sync(self, timeout: float = 30.0) -> None:
        left = self.producer.flush(timeout)
        self._check()
        if left:
            raise DeliveryError(f"{left} record(s) still undelivered after {timeout}s")

    async def settle(self, timeout: float = 30.0) -> None:
        """Wait for every produced record without blocking the event loop; raise if any failed."""
        producer, deadline, pause = self.producer, time.monotonic() + timeout, 0.0005
        producer.poll(0)
        while len(producer):
            if time.monotonic() > deadline:
                self._check()
                raise DeliveryError(f"{len(producer)} record(s) still undelivered after {timeout}s")
            await asyncio.sleep(pause)
            pause = min(pause * 2, 0.01)
            producer.poll(0)
        self._check()

    async def flush(self, timeout: float = 30.0) -> None:
        await self.settle(timeout)

    async def deliver(
        self,
        produce: Callable[[], None],
        on_failure: Callable[[DeliveryError, float], None],
        first_delay: float = 0.5,
        max_delay: float = 30.0,
        should_stop: Callable[[], bool] = lambda: False,
        produced: bool = False,
    ) -> int:
        """Produce a batch's records (`produce`) and wait for all of them; when any fails, produce
        the whole batch again after a backoff, until it is delivered or `should_stop()`. Nothing of
        the batch is acknowledged meanwhile, so its inputs are held, not lost; re-sent records are
        harmless (changelog records by key, send requests by idempotency key). Returns the
        attempts (0: given up because of should_stop). `produced`: the first attempt was already
        produced (the pipeline produces, computes the next batch, then comes here to wait)."""
        delay, attempts = first_delay, 0
        while True:
            attempts += 1
            try:
                if not produced or attempts > 1:
                    produce()
                await self.flush()
                return attempts
            except DeliveryError as e:
                on_failure(e, delay)
                if should_stop():
                    return 0
                await asyncio.sleep(delay)
                delay = min(delay * 2, max_delay)

    def close(self, timeout: float = 5.0) -> None:
        self.producer.flush(timeout)
