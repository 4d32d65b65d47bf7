"""A worker's RocksDB partitions share one memory budget, also when their databases already exist."""

from __future__ import annotations

import time
from pathlib import Path

from nudgeflow.agents.store import SharedMemoryOptions

MB = 2**20


def test_partitions_share_one_block_cache_and_write_buffer_manager_also_when_reopened(tmp_path: Path) -> None:
    opts = SharedMemoryOptions(64 * MB, write_buffer_size=16 * MB, max_write_buffer_number=2, use_rocksdict=True)
    for round_ in range(2):  # created, then reopened (rocksdict would take their options from disk)
        dbs = [opts.open(tmp_path / f"p{p}") for p in range(2)]
        for p, db in enumerate(dbs):
            keys = [b"%d:%d:%05d" % (round_, p, i) for i in range(2000)]
            written, base = opts.write_buffers.get_usage(), opts.cache.get_usage()
            for k in keys:
                db[k] = bytes(1000)
            assert opts.write_buffers.get_usage() >= written + MB  # the memtable is charged to the one manager
            db.flush(True)
            # the flushed memtable's reservation in the cache is sometimes given back a moment later
            deadline = time.monotonic() + 5
            while opts.cache.get_usage() >= base + MB and time.monotonic() < deadline:
                time.sleep(0.01)
            cached = opts.cache.get_usage()
            assert all(db[k] == bytes(1000) for k in keys)  # from the table file: its blocks are cached now
            assert opts.cache.get_usage() >= cached + MB  # in the one cache
        for db in dbs:
            db.close()
