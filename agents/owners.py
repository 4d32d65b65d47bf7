"""Partition ownership generations: fencing a worker that goes on writing after it lost a partition.

A worker that the group coordinator has evicted (a frozen broker, a long pause, a network cut) does
not know it yet: until its next heartbeat it keeps applying batches and producing their changelog
records, while the new owner restores the same partition and writes its own. Records of such a
*zombie* that land in the changelog after the new owner's restore would, at a later restore, put
older user states on top of newer ones (a pending timer forgotten: a send lost). Kafka has no
fencing for plain producers, so nudgeflow keeps its own:

- Every owner of a partition has a *generation*, one more than any before it. Taking a partition
  (after assignment, before restoring it), the worker writes a *fence* record into the changelog
  partition (key `__nudgeflow_fence__:<gen>`, unique per generation so compaction keeps them all)
  and records `(generation, fence offset)` in the compacted owners topic `<app_id>-owners`.
- Every changelog record the worker writes carries its generation in header `nf_gen`.
- A restore reads the changelog in order and skips a record whose generation is older than the
  newest fence read before it: whatever a zombie wrote after the new owner fenced it is ignored.
- A worker's local store keeps the generation it wrote with. Taking a partition again, if a newer
  owner fenced it and the local store has written past that fence, the local store holds a
  zombie's writes: it is emptied and restored from the changelog's start.

The new owner itself never reads what zombies write after its fence; their send requests are the
same requests (the same inputs, deterministic keys) that the new owner makes, and senders deliver
each key once.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import orjson
from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, Producer, TopicPartition

from nudgeflow.engine.errors import NudgeflowError

GEN_HEADER = "nf_gen"
FENCE_PREFIX = b"__nudgeflow_fence__:"
OWNERS_CONFIG = {"cleanup.policy": "compact", "retention.ms": "-1"}


class OwnershipError(NudgeflowError):
    """The owners topic or a fence could not be read or written."""


@dataclass(frozen=True)
class Owner:
    gen: int
    fence_offset: int  # the changelog offset of the fence this owner wrote


def record_gen(headers: Sequence[tuple[str, bytes]] | None) -> int | None:
    """The generation a changelog record was written with (None: written before generations)."""
    for k, v in headers or ():
        if k == GEN_HEADER:
            try:
                return int(v)
            except ValueError:
                return None
    return None


def fence_gen(key: bytes) -> int | None:
    """The generation of a fence record's key, or None for any other key."""
    if not key.startswith(FENCE_PREFIX):
        return None
    try:
        return int(key[len(FENCE_PREFIX) :])
    except ValueError:
        return None


def read_owners(client_conf: Mapping[str, Any], topic: str, timeout: float = 30.0) -> dict[int, Owner]:
    """The latest owner of every changelog partition (the owners topic read to its end)."""
    consumer = Consumer(
        {
            **client_conf,
            "group.id": f"{topic}-reader",
            "enable.auto.commit": False,
            "enable.partition.eof": True,
            "log_level": 3,
        }
    )
    owners: dict[int, Owner] = {}
    try:
        consumer.assign([TopicPartition(topic, 0, OFFSET_BEGINNING)])
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            m = consumer.poll(0.5)
            if m is None:
                continue
            err = m.error()
            if err is not None:
                if err.code() == KafkaError._PARTITION_EOF:
                    return owners
                raise OwnershipError(f"cannot read {topic}: {err}")
            key, value = m.key(), m.value()
            if key is None or value is None:
                continue
            doc = orjson.loads(value)
            owners[int(key)] = Owner(int(doc["gen"]), int(doc["fence_offset"]))
        raise OwnershipError(f"no end of {topic} within {timeout:.0f}s")
    finally:
        consumer.close()


def tainted(latest: Owner | None, local_gen: int | None, held: int | None) -> bool:
    """Whether a local store wrote past the fence of an owner newer than itself (a zombie's writes)."""
    if latest is None or held is None:
        return False
    return latest.gen > (local_gen or 0) and held > latest.fence_offset


def claim(
    client_conf: Mapping[str, Any],
    owners_topic: str,
    changelog: str,
    partitions: Sequence[int],
    latest: Mapping[int, Owner],
    local_gens: Mapping[int, int | None],
    timeout: float = 30.0,
) -> dict[int, int]:
    """Fence each partition with a new generation and record it as the owner; the generations."""
    producer = Producer({**client_conf, "enable.idempotence": True, "linger.ms": 0, "log_level": 3})
    gens: dict[int, int] = {}
    offsets: dict[int, int] = {}
    failed: list[str] = []

    def delivered(err: KafkaError | None, msg: Any) -> None:
        if err is not None:
            failed.append(str(err))
        else:
            offsets[msg.partition()] = msg.offset()

    for p in partitions:
        prior = latest.get(p)
        gens[p] = max(prior.gen if prior else 0, local_gens.get(p) or 0) + 1
        gen = str(gens[p]).encode()
        producer.produce(changelog, gen, FENCE_PREFIX + gen, p, on_delivery=delivered, headers=[(GEN_HEADER, gen)])
    if producer.flush(timeout) or failed or len(offsets) != len(partitions):
        raise OwnershipError(f"cannot write the fences of {changelog}: {failed[:1] or 'timeout'}")
    for p in partitions:
        doc = orjson.dumps({"gen": gens[p], "fence_offset": offsets[p], "at": int(time.time() * 1000)})
        producer.produce(owners_topic, doc, str(p).encode(), 0, on_delivery=delivered)
    if producer.flush(timeout) or failed:
        raise OwnershipError(f"cannot record the owners in {owners_topic}: {failed[:1] or 'timeout'}")
    return gens
