"""The journey state table's storage: the only code that touches RocksDB.

Faust owns the table's lifecycle (one RocksDB per assigned partition, opened on assignment,
closed on revocation), through `SharedMemoryStore`: Faust's RocksDB store whose partitions share
one memory budget (see there). `StateStore` reads and writes those databases directly, a batch at a time,
instead of through Faust's per-key table API. Each batch is one WriteBatch per partition
(atomic): user records, input positions, timer-index changes and the changelog offset the
records reached, always after the same records are durable in the changelog, so a restore from
the changelog yields what was written here.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import rocksdict
from faust.stores import STORES
from faust.stores import rocksdb as faust_rocksdb
from rocksdict import WriteBatch

from nudgeflow.agents.batch import Write, record_wake
from nudgeflow.agents.keys import (
    CHANGELOG_OFFSET,
    LEGACY_END_MARKER,
    OWNER_GEN,
    TIMER,
    USER,
    position_key,
    timer_key,
)

MEMORY_OPTION = "memory_bytes"  # the table option that carries Settings.rocksdb_memory_mb


class SharedMemoryOptions(faust_rocksdb.RocksDBOptions):
    """Faust's RocksDB options, except that every partition's database uses the same block cache,
    and their memtables are charged to that cache by one write buffer manager (at most half of
    it): a worker's RocksDB memory stays within one budget however many partitions it is given
    (Faust's options make a cache and memtables per partition, bounded by nothing across them:
    32 partitions, 32 times the memory)."""

    def __init__(self, memory_bytes: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.cache = rocksdict.Cache(memory_bytes)
        self.write_buffers = rocksdict.WriteBufferManager.new_write_buffer_manager_with_cache(
            memory_bytes // 2, False, self.cache
        )

    def open(self, path: Path, *, read_only: bool = False) -> rocksdict.Rdict:
        """As Faust opens a partition's database, with these options also when it exists: rocksdict
        would otherwise take the existing database's options from its OPTIONS file, where caches
        and write buffer managers are not kept (RocksDB's 8 MB default cache, per database)."""
        opts = self.as_options()
        access = rocksdict.AccessType.read_write() if self.ttl is None else rocksdict.AccessType.with_ttl(self.ttl)
        db = rocksdict.Rdict(str(path), options=opts, column_families={"default": opts}, access_type=access)
        db.set_read_options(rocksdict.ReadOptions())
        return db

    def as_options(self) -> rocksdict.Options:
        opts: rocksdict.Options = super().as_options()
        table = rocksdict.BlockBasedOptions()  # as Faust's, with the shared cache
        table.set_bloom_filter(self.bloom_filter_size, block_based=True)
        table.set_block_cache(self.cache)
        table.set_index_type(rocksdict.BlockBasedIndexType.binary_search())
        opts.set_block_based_table_factory(table)
        opts.set_write_buffer_manager(self.write_buffers)
        return opts


class SharedMemoryStore(faust_rocksdb.Store):
    """Faust's RocksDB store (rocksdict) with `SharedMemoryOptions`; the app's `store=` is
    `nudgeflow://`, registered in Faust's store registry below."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        options = self.options or {}
        memory = options.get(MEMORY_OPTION)
        if memory is not None:  # (Faust builds a second store of the table that opens nothing)
            extra = {k: v for k, v in options.items() if k != MEMORY_OPTION}
            self.rocksdb_options = SharedMemoryOptions(int(memory), **extra, use_rocksdict=True)


STORES.aliases["nudgeflow"] = f"{__name__}:SharedMemoryStore"


class StateStore:
    def __init__(self, table: Any) -> None:
        self.table = table

    def db(self, partition: int) -> Any:
        # Faust's store exposes the partition's Rdict only through this private accessor
        return self.table.data._db_for_partition(partition)

    def get_many(self, partition: int, keys: list[bytes]) -> list[bytes | None]:
        result: list[bytes | None] = self.db(partition).get(keys)
        return result

    def write(
        self,
        writes: Mapping[int, Sequence[Write]],
        local: Mapping[int, Sequence[Write]],
        changelog_offsets: Mapping[int, int],
    ) -> None:
        """One WriteBatch per partition: its writes (also in the changelog), local writes, and the
        changelog offset they reached."""
        for p in set(writes) | set(local) | set(changelog_offsets):
            wb = WriteBatch(raw_mode=True)
            for ops in (writes.get(p, ()), local.get(p, ())):
                for key, value in ops:
                    if value is None:
                        wb.delete(key)
                    else:
                        wb.put(key, value)
            if p in changelog_offsets:
                wb.put(CHANGELOG_OFFSET, str(changelog_offsets[p]).encode())
            self.db(p).write(wb)

    def keys_from(self, partition: int, start: bytes, prefix: bytes) -> Iterator[bytes]:
        """Keys >= start that begin with prefix, in key order."""
        it = self.db(partition).iter()
        it.seek(start)
        while it.valid():
            key: bytes = it.key()
            if not key.startswith(prefix):
                return
            yield key
            it.next()

    def values_from(self, partition: int, prefix: bytes) -> Iterator[bytes]:
        """The values of every key that begins with prefix, in key order."""
        it = self.db(partition).iter()
        it.seek(prefix)
        while it.valid():
            if not it.key().startswith(prefix):
                return
            yield it.value()
            it.next()

    def positions(self, partition: int, topics: Sequence[str]) -> dict[str, int]:
        """Where each input topic of this partition resumes, for the topics that have a position."""
        got = self.get_many(partition, [position_key(t) for t in topics])
        return {t: int(v) for t, v in zip(topics, got, strict=True) if v is not None}

    def changelog_offset(self, partition: int) -> int | None:
        raw = self.db(partition).get(CHANGELOG_OFFSET)
        return int(raw) if raw is not None else None

    def owner_gen(self, partition: int) -> int | None:
        raw = self.db(partition).get(OWNER_GEN)
        return int(raw) if raw is not None else None

    def set_owner_gen(self, partition: int, gen: int) -> None:
        self.db(partition).put(OWNER_GEN, str(gen).encode())

    def wipe(self, partition: int) -> None:
        """Empty the partition's store (every key: records, positions, timers, offsets)."""
        self.db(partition).delete_range(b"", b"\xff")

    def restore(self, partition: int, records: Sequence[tuple[bytes, bytes | None]], last_offset: int) -> int:
        """Apply changelog records (in log order) to the partition's store with their timer-index
        changes, and record the changelog offset reached. Returns how many records were applied."""
        latest: dict[bytes, bytes | None] = {}
        for key, value in records:
            if key.startswith(TIMER) or key == LEGACY_END_MARKER:
                continue  # 0.1 changelogged the timer index: it is rebuilt from the records instead
            latest[key] = value
        users = [k for k in latest if k.startswith(USER)]
        db = self.db(partition)
        before = dict(zip(users, db.get(users), strict=True)) if users else {}
        wb = WriteBatch(raw_mode=True)
        for key, value in latest.items():
            if value is None:
                wb.delete(key)
            else:
                wb.put(key, value)
            if key in before:
                old, new = record_wake(before[key]), record_wake(value)
                if old != new:
                    user = key[len(USER) :].decode()
                    if old is not None:
                        wb.delete(timer_key(old, user))
                    if new is not None:
                        wb.put(timer_key(new, user), b"1")
        wb.put(CHANGELOG_OFFSET, str(last_offset).encode())
        db.write(wb)
        return len(latest)
