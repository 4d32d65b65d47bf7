"""Restore from the changelog over TCP: a local store that holds changelog offsets the changelog
does not have (it was deleted and created again) is refused with a clear error, never silently
mixed; a store that is behind is brought up to the changelog's end."""

from __future__ import annotations

import uuid

import pytest
from confluent_kafka import Producer

from nudgeflow.agents.restore import ChangelogBehind, restore_partitions
from nudgeflow.broker import EmbeddedBroker, ensure_topics

pytestmark = pytest.mark.integration


class Store:
    """What restore_partitions needs of the state store: the held offset, and somewhere to write."""

    def __init__(self, held: int | None) -> None:
        self.held = held
        self.records: list[tuple[bytes, bytes | None]] = []

    def changelog_offset(self, partition: int) -> int | None:
        return self.held

    def restore(self, partition: int, records: list[tuple[bytes, bytes | None]], last: int) -> None:
        self.records += records
        self.held = last


def changelog_with(broker: EmbeddedBroker, n: int) -> str:
    name = f"restore-{uuid.uuid4().hex[:8]}-changelog"
    ensure_topics(broker.bootstrap, [name], 1, 86_400_000)
    p = Producer({"bootstrap.servers": broker.bootstrap})
    for i in range(n):
        p.produce(name, key=f"u:{i}".encode(), value=b"{}", partition=0)
    p.flush(10)
    return name


def test_a_store_ahead_of_its_changelog_is_refused(broker: EmbeddedBroker) -> None:
    name = changelog_with(broker, 3)
    with pytest.raises(ChangelogBehind) as e:
        restore_partitions({"bootstrap.servers": broker.bootstrap}, name, [0], Store(held=500), idle_timeout=20)  # type: ignore[arg-type]
    assert "NUDGEFLOW_DATA_DIR" in str(e.value) and "up to 500" in str(e.value)


def test_a_store_behind_its_changelog_reads_the_rest(broker: EmbeddedBroker) -> None:
    name = changelog_with(broker, 5)
    store = Store(held=1)
    (r,) = restore_partitions({"bootstrap.servers": broker.bootstrap}, name, [0], store, idle_timeout=20)  # type: ignore[arg-type]
    assert [k for k, _ in store.records] == [b"u:2", b"u:3", b"u:4"] and r.end == 5 and store.held == 4


def test_records_a_fenced_off_owner_wrote_after_the_fence_are_skipped(broker: EmbeddedBroker) -> None:
    from nudgeflow.agents.owners import FENCE_PREFIX, GEN_HEADER, Owner, tainted

    name = f"restore-{uuid.uuid4().hex[:8]}-changelog"
    ensure_topics(broker.bootstrap, [name], 1, 86_400_000)
    p = Producer({"bootstrap.servers": broker.bootstrap})

    def put(key: bytes, value: bytes, gen: int) -> None:
        p.produce(name, key=key, value=value, partition=0, headers=[(GEN_HEADER, str(gen).encode())])

    put(FENCE_PREFIX + b"1", b"1", 1)
    put(b"u:a", b"a-by-1", 1)
    put(FENCE_PREFIX + b"2", b"2", 2)  # worker 2 took the partition over
    put(b"u:a", b"a-by-2", 2)
    put(b"u:a", b"a-by-1-late", 1)  # worker 1 did not know yet: a zombie's write, after the fence
    put(b"u:b", b"b-by-1-late", 1)
    put(b"u:b", b"b-by-2", 2)
    p.flush(10)
    store = Store(held=None)
    (r,) = restore_partitions({"bootstrap.servers": broker.bootstrap}, name, [0], store, idle_timeout=20)  # type: ignore[arg-type]
    assert dict(store.records) == {b"u:a": b"a-by-2", b"u:b": b"b-by-2"} and r.fenced == 2
    # worker 1's own store: it wrote past worker 2's fence (offset 2) -> emptied and restored whole
    assert tainted(Owner(gen=2, fence_offset=2), local_gen=1, held=4)
    assert not tainted(Owner(gen=2, fence_offset=2), local_gen=1, held=1)  # stopped before the fence
    assert not tainted(Owner(gen=2, fence_offset=2), local_gen=2, held=6)  # it is the newest owner
