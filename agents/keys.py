"""Key layout of the journey state table (one RocksDB per partition, one changelog topic).

    u:<user_id>                          -> orjson agents.batch.UserRecord {"state", "offsets"}
    p:<input topic>                      -> b"<offset>": where this partition's input resumes
    t:<due, 8 bytes big-endian><user_id> -> b"1"   (the timer index, ordered by due time)
    __faust\\0offset__                    -> b"<offset>": the last changelog offset in this DB
    o:gen                                -> b"<generation>": this store's ownership generation (local)
    c:users                              -> orjson {"<journey>\x1f<step>": users}: who is where now (agents.occupancy)
    s:<journey>@<version>:<digest>       -> last user key a current-members scan checked (agents.members)

User records and input positions are written to RocksDB and to the changelog in the same batch,
so a restore brings back state and the input position that goes with it. The timer index is
local only: a restore rebuilds it from the records' wake-up times. The last key is Faust's own
name for the changelog offset a partition's store holds (`faust.stores.rocksdb.Store.offset_key`).
"""

from __future__ import annotations

USER = b"u:"
POSITION = b"p:"
TIMER = b"t:"
CHANGELOG_OFFSET = b"__faust\x00offset__"
OWNER_GEN = b"o:gen"  # local only: the ownership generation this store writes with (agents/owners.py)
LEGACY_END_MARKER = b"m:end"  # written by nudgeflow 0.1 to the changelog; skipped on restore


def user_key(user: str) -> bytes:
    return USER + user.encode()


def position_key(topic: str) -> bytes:
    return POSITION + topic.encode()


def timer_key(due: int, user: str) -> bytes:
    return TIMER + (due if due > 0 else 0).to_bytes(8, "big") + user.encode()


def parse_timer_key(key: bytes) -> tuple[int, str]:
    return int.from_bytes(key[2:10], "big"), key[10:].decode()
