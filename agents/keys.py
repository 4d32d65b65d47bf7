"""Key layout of the journey state table (one RocksDB per partition, one changelog topic).

    u:<user_id>                      -> orjson agents.batch.UserRecord {"state", "offsets"}
    t:<due, 8 bytes big-endian><user_id> -> b"1"   (the timer index, ordered by due time)

Both live in the same table so they share a partition, a WriteBatch and a changelog: a restore
brings back timers and state together.
"""

from __future__ import annotations

USER = b"u:"
TIMER = b"t:"


def user_key(user: str) -> bytes:
    return USER + user.encode()


def timer_key(due: int, user: str) -> bytes:
    return TIMER + max(due, 0).to_bytes(8, "big") + user.encode()


def parse_timer_key(key: bytes) -> tuple[int, str]:
    return int.from_bytes(key[2:10], "big"), key[10:].decode()
