"""Kafka clients and the process loop shared by the channel-side processes (senders, call runner)."""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Awaitable, Callable, Iterable, Iterator
from typing import Any

from confluent_kafka import Consumer, KafkaError, Producer

from nudgeflow.broker import Target, client_conf


def channel_consumer(bootstrap: Target, group: str, session_timeout_ms: int) -> Consumer:
    """At-least-once: offsets are committed by hand, after the work is done."""
    return Consumer(
        client_conf(bootstrap)
        | {
            "group.id": group,
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
            "session.timeout.ms": session_timeout_ms,
            "log_level": 3,
        }
    )


def feedback_producer(bootstrap: Target) -> Producer:
    """murmur2, the partitioner the input topics are expected to use (Java clients' default), so
    what goes back to the worker lands on the partition that holds the user's state."""
    return Producer(client_conf(bootstrap, **{"linger.ms": 5, "log_level": 3, "partitioner": "murmur2_random"}))


def ok_messages(msgs: Iterable[Any], log: logging.Logger) -> Iterator[Any]:
    """The messages of a consume() result, logging consumer errors (partition EOF is not one)."""
    for m in msgs:
        if m.error():
            if m.error().code() != KafkaError._PARTITION_EOF:
                log.warning("consumer error: %s", m.error())
            continue
        yield m


def run_until_signalled(main: Callable[[], Awaitable[None]], stop: Callable[[], None]) -> None:
    """Run an async main loop; SIGINT/SIGTERM ask it to stop after its current batch."""
    loop = asyncio.new_event_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop)
    try:
        loop.run_until_complete(main())
    finally:
        loop.close()
