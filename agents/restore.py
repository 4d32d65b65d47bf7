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
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, cast

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, TopicPartition

from nudgeflow.agents.owners import fence_gen, record_gen
from nudgeflow.agents.store import StateStore
from nudgeflow.engine.errors import NudgeflowError

log = logging.getLogger("nudgeflow.worker")


class RestoreError(NudgeflowError):
    """The changelog could not be read to its end."""


class ChangelogBehind(RestoreError):
    """The local store holds changelog offsets the changelog does not have (it was deleted and
    created again, or truncated): the local state cannot be trusted to match it."""


def _behind(changelog: str, p: int, start: int) -> ChangelogBehind:
    return ChangelogBehind(
        f"the local store of partition {p} holds changelog offsets up to {start - 1}, which {changelog} does "
        "not have (deleted and created again, or truncated): point NUDGEFLOW_DATA_DIR at an empty directory "
        "(state is restored from the changelog) or delete this one"
    )


@dataclass
class Restored:
    partition: int
    records: int  # changelog records read
    seconds: float
    start: int  # first changelog offset read
    end: int  # the changelog's end (next offset) when done
    fenced: int = 0  # records skipped: written by an owner after a newer one had fenced it


def restore_partitions(
    client_conf: dict[str, Any],
    changelog: str,
    partitions: list[int],
    store: StateStore,
    chunk: int = 20_000,
    idle_timeout: float = 60.0,
    progress: Callable[[int, int, int | None], None] | None = None,
    should_stop: Callable[[], bool] = lambda: False,
    gens: Mapping[int, int] | None = None,
    from_start: Sequence[int] = (),
) -> list[Restored]:
    """Bring each partition's store up to the end of its changelog, all read by one consumer.
    `progress(partition, records so far, records remaining or None)` is called after every chunk; `should_stop()` aborts
    between chunks."""
    t0 = time.monotonic()
    starts = {}
    for p in partitions:
        held = None if p in from_start else store.changelog_offset(p)
        starts[p] = held + 1 if held is not None else OFFSET_BEGINNING
    # the newest ownership fence read so far per partition: older generations' records after it
    # are a fenced-off zombie's (agents/owners.py); `gens` holds the fence the local store is at
    fence = {p: (gens or {}).get(p, 0) if starts[p] != OFFSET_BEGINNING else 0 for p in partitions}
    skipped = dict.fromkeys(partitions, 0)
    consumer = Consumer(
        {
            **client_conf,
            "group.id": f"nudgeflow-restore-{changelog}",  # never subscribes nor commits: assign only
            "enable.auto.commit": False,
            "enable.partition.eof": True,
            "auto.offset.reset": "error",  # a start beyond the end: the changelog is behind (see below)
            "fetch.max.bytes": 64 * 2**20,
            "log_level": 3,
        }
    )
    pending: dict[int, list[tuple[bytes, bytes | None]]] = {p: [] for p in partitions}
    last: dict[int, int | None] = {p: None for p in partitions}
    first: dict[int, int | None] = {p: None for p in partitions}
    done: dict[int, float] = {}
    count = dict.fromkeys(partitions, 0)
    try:
        consumer.assign([TopicPartition(changelog, p, off) for p, off in starts.items()])
        quiet_since = time.monotonic()
        while len(done) < len(partitions):
            if should_stop():
                raise RestoreError(f"restore of {changelog} stopped")
            msgs = consumer.consume(chunk, 0.2)
            ended = []
            for m in msgs:
                p = m.partition()
                err = m.error()
                if err is not None:
                    if err.code() == KafkaError._PARTITION_EOF:
                        ended.append(p)
                        continue
                    if err.code() == KafkaError._AUTO_OFFSET_RESET:
                        raise _behind(changelog, p, starts[p])
                    raise RestoreError(f"cannot read {changelog}[{p}]: {err}")
                key = m.key()
                if key is not None:
                    gen = record_gen(m.headers())
                    fg = fence_gen(key) if key[:1] == b"_" else None
                    if fg is not None:
                        fence[p] = max(fence[p], fg)
                    elif gen is not None and gen < fence[p]:
                        skipped[p] += 1
                    else:
                        pending[p].append((key, m.value()))
                last[p] = m.offset()
                if first[p] is None:
                    first[p] = m.offset()
            if not msgs:  # a broker that answers a fetch past the end with no error (Tansu): its high watermark
                for p in partitions:
                    if p not in done and first[p] is None and starts[p] >= 0:
                        _, high = consumer.get_watermark_offsets(TopicPartition(changelog, p), cached=True)
                        if 0 <= high < starts[p]:
                            raise _behind(changelog, p, starts[p])
            if msgs:
                quiet_since = time.monotonic()
            elif time.monotonic() - quiet_since > idle_timeout:
                raise RestoreError(f"no answer reading {changelog} for {idle_timeout:.0f}s")
            for p, recs in pending.items():
                if recs and (p in ended or len(recs) >= chunk):
                    store.restore(p, recs, cast(int, last[p]))
                    count[p] += len(recs)
                    pending[p] = []
                    if progress:
                        _, high = consumer.get_watermark_offsets(TopicPartition(changelog, p), cached=True)
                        progress(p, count[p], max(0, high - cast(int, last[p]) - 1) if high >= 0 else None)
            for p in ended:
                if p not in done and not pending[p]:
                    done[p] = time.monotonic() - t0
    finally:
        consumer.close()
    out = []
    for p in partitions:
        lp = last[p]
        end = lp + 1 if lp is not None else (starts[p] if starts[p] >= 0 else 0)
        fp = first[p]
        out.append(Restored(p, count[p], done.get(p, 0.0), fp if fp is not None else end, end, skipped[p]))
    return out
