"""Producing with confluent-kafka: many records per batch, then one wait for all deliveries.

Faust's own producer sends one awaited message at a time; the journey agent instead produces a
batch's changelog records and send requests here and waits once. Idempotence keeps per-partition
order, which the changelog relies on (a timer record precedes the state that needs it).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from confluent_kafka import KafkaError, KafkaException, Producer

from nudgeflow.engine.errors import NudgeflowError


class DeliveryError(NudgeflowError):
    """Records could not be delivered; the batch is not acknowledged and will be replayed."""


class Output:
    def __init__(self, bootstrap: str, extra: dict[str, Any] | None = None) -> None:
        conf = {
            "bootstrap.servers": bootstrap,
            "enable.idempotence": True,
            "linger.ms": 5,
            "log_level": 3,
            **(extra or {}),
        }
        self.producer = Producer(conf)
        self.failed: list[KafkaError] = []

    def _delivered(self, err: KafkaError | None, _msg: Any) -> None:
        if err is not None:
            self.failed.append(err)

    def produce(
        self,
        topic: str,
        value: bytes | None,
        key: bytes | None = None,
        partition: int | None = None,
        headers: list[tuple[str, bytes]] | None = None,
    ) -> None:
        kwargs: dict[str, Any] = {"key": key, "value": value, "on_delivery": self._delivered}
        if partition is not None:
            kwargs["partition"] = partition
        if headers:
            kwargs["headers"] = headers
        while True:
            try:
                self.producer.produce(topic, **kwargs)
                return
            except BufferError:  # local queue full: let librdkafka drain it
                self.producer.poll(0.05)
            except KafkaException as e:
                raise DeliveryError(f"cannot produce to {topic}: {e}") from e

    def flush_sync(self, timeout: float = 30.0) -> None:
        left = self.producer.flush(timeout)
        if self.failed:
            errs, self.failed = self.failed, []
            raise DeliveryError(f"{len(errs)} record(s) not delivered: {errs[0]}")
        if left:
            raise DeliveryError(f"{left} record(s) still undelivered after {timeout}s")

    async def flush(self, timeout: float = 30.0) -> None:
        """Wait for every produced record without blocking the event loop."""
        await asyncio.get_running_loop().run_in_executor(None, self.flush_sync, timeout)

    async def deliver(
        self,
        produce: Callable[[], None],
        on_failure: Callable[[DeliveryError, float], None],
        first_delay: float = 0.5,
        max_delay: float = 30.0,
    ) -> int:
        """Produce a batch's records (`produce`) and wait for all of them; when any fails, produce
        the whole batch again after a backoff, until it is delivered. Nothing of the batch is
        acknowledged meanwhile, so its inputs are held, not lost; re-sent records are harmless
        (changelog records by key, send requests by idempotency key). Returns the attempts."""
        delay, attempts = first_delay, 0
        while True:
            attempts += 1
            try:
                produce()
                await self.flush()
                return attempts
            except DeliveryError as e:
                on_failure(e, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, max_delay)
