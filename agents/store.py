"""The journey state table's storage: the only code that touches RocksDB.

Faust owns the table's lifecycle (one RocksDB per assigned partition, opened on assignment,
restored from the changelog topic, closed on revocation); this class reads and writes those
databases directly, a batch at a time, instead of through Faust's per-key table API. Writes are
one WriteBatch per partition (atomic), always after the same records are durable in the
changelog, so a restore from the changelog yields what was written here.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from rocksdict import WriteBatch

Write = tuple[bytes, bytes | None]  # (key, value); None deletes


class StateStore:
    def __init__(self, table: Any) -> None:
        self.table = table

    def _db(self, partition: int) -> Any:
        # Faust's store exposes the partition's Rdict only through this private accessor
        return self.table.data._db_for_partition(partition)

    def get_many(self, partition: int, keys: list[bytes]) -> list[bytes | None]:
        result: list[bytes | None] = self._db(partition).get(keys)
        return result

    def write(self, writes: Mapping[int, Sequence[Write]]) -> None:
        """Apply each partition's writes in order, atomically per partition."""
        for p, ops in writes.items():
            wb = WriteBatch(raw_mode=True)
            for key, value in ops:
                if value is None:
                    wb.delete(key)
                else:
                    wb.put(key, value)
            self._db(p).write(wb)

    def keys_from(self, partition: int, start: bytes, prefix: bytes) -> Iterator[bytes]:
        """Keys >= start that begin with prefix, in key order."""
        it = self._db(partition).iter()
        it.seek(start)
        while it.valid():
            key: bytes = it.key()
            if not key.startswith(prefix):
                return
            yield key
            it.next()
