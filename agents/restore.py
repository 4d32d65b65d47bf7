"""Restoring a partition's state from its changelog, in bulk.

Faust would restore the state table one record at a time through its consumer, stream and
table machinery (about 5,000 records/s here: over five minutes for a million users). nudgeflow
turns Faust's recovery off for the table (`agents.framework`) and does it itself when a
partition is assigned: it reads the changelog partition from the offset the local store already
holds (everything, for an empty data dir) to its end with a plain confluent-kafka consumer, and
writes it in WriteBatches of up to `chunk` records, rebuilding the timer index from the
records' wake-up times as it goes. The end is the fetch high watermark (partition EOF), not
ListOffsets, which Tansu answers with the last batch's base offset + 1.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, TopicPartition

from nudgeflow.agents.store import StateStore
from nudgeflow.engine.errors import NudgeflowError

log = logging.getLogger("nudgeflow.worker")


class RestoreError(NudgeflowError):
    """The changelog could not be read to its end."""


@dataclass
class Restored:
    partition: int
    records: int  # changelog records read
    seconds: float
    start: int  # first changelog offset read
    end: int  # the changelog's end (next offset) when done


def restore_partition(
    client_conf: dict[str, Any],
    changelog: str,
    partition: int,
    store: StateStore,
    chunk: int = 20_000,
    idle_timeout: float = 60.0,
    progress: Callable[[int, int], None] | None = None,
    should_stop: Callable[[], bool] = lambda: False,
) -> Restored:
    """Bring partition `partition`'s store up to the end of its changelog. `progress(partition,
    records so far)` is called after every chunk; `should_stop()` aborts between chunks."""
    t0 = time.monotonic()
    held = store.changelog_offset(partition)
    start = held + 1 if held is not None else OFFSET_BEGINNING
    consumer = Consumer(
        {
            **client_conf,
            "group.id": f"nudgeflow-restore-{changelog}",  # never subscribes nor commits: assign only
            "enable.auto.commit": False,
            "enable.partition.eof": True,
            "auto.offset.reset": "earliest",
            "fetch.max.bytes": 64 * 2**20,
            "log_level": 3,
        }
    )
    n, last, first = 0, held, None
    try:
        consumer.assign([TopicPartition(changelog, partition, start)])
        pending: list[tuple[bytes, bytes | None]] = []
        quiet_since = time.monotonic()
        while True:
            if should_stop():
                raise RestoreError(f"restore of {changelog}[{partition}] stopped")
            msgs = consumer.consume(chunk, 0.5)
            at_end = False
            for m in msgs:
                err = m.error()
                if err is not None:
                    if err.code() == KafkaError._PARTITION_EOF:
                        at_end = True
                        continue
                    raise RestoreError(f"cannot read {changelog}[{partition}]: {err}")
                key = m.key()
                if key is not None:
                    pending.append((key, m.value()))
                last = m.offset()
                first = last if first is None else first
            if msgs:
                quiet_since = time.monotonic()
            elif time.monotonic() - quiet_since > idle_timeout:
                raise RestoreError(f"no answer reading {changelog}[{partition}] for {idle_timeout:.0f}s")
            if pending and (at_end or len(pending) >= chunk):
                assert last is not None
                store.restore(partition, pending, last)
                n += len(pending)
                pending = []
                if progress:
                    progress(partition, n)
            if at_end:
                break
    finally:
        consumer.close()
    end = (last + 1) if last is not None else 0
    return Restored(partition, n, time.monotonic() - t0, first if first is not None else end, end)
