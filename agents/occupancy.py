"""How many users are at each journey step now (`nudgeflow_journey_users`), exact across restarts.

Counters say what happened since a process started; "how many are waiting at day_3 right now"
needs the state itself. Each partition keeps its counts per (journey, step) under one key of its
store, `c:users`, rewritten with every batch that moves someone (to RocksDB and the changelog, in
the same write as the records that moved): a restart or a new owner reads the counts back with
the records they describe. A store from before this key existed is counted once, at assignment.
The batch core finds the moves by comparing each touched user's steps before and after a batch.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from typing import Any

import orjson

from nudgeflow.engine.core import journey_id

OCCUPANCY = b"c:users"
SEP = "\x1f"


Steps = tuple[tuple[str, str], ...]


def steps_of(state: Mapping[str, Any]) -> Steps:
    """(instance key, step) of each instance of a user's state (cheap: taken for every user a batch
    touches; turned into journey names only when they differ)."""
    instances = state["instances"]
    if not instances:
        return ()
    if len(instances) == 1:  # most users: no list comprehension (a function call in Python 3.11)
        for ik, i in instances.items():
            return ((ik, i["step"]),)
    return tuple([(ik, i["step"]) for ik, i in instances.items()])


class Occupancy:
    def __init__(self) -> None:
        self.by_partition: dict[int, Counter[str]] = {}

    def load(self, p: int, raw: bytes | None) -> None:
        self.by_partition[p] = Counter(orjson.loads(raw)) if raw else Counter()

    def census(self, p: int, states: Iterable[Mapping[str, Any]]) -> None:
        """Count a partition's users where the counts were never stored."""
        self.by_partition[p] = Counter()
        for st in states:
            self.move(p, (), steps_of(st))

    def move(self, p: int, before: Steps, after: Steps) -> None:
        c = self.by_partition.setdefault(p, Counter())
        for ik, step in before:
            c[journey_id(ik) + SEP + step] -= 1
        for ik, step in after:
            c[journey_id(ik) + SEP + step] += 1

    def encoded(self, p: int) -> bytes:
        return orjson.dumps({k: v for k, v in self.by_partition.get(p, {}).items() if v})

    def forget(self, partitions: Iterable[int] | None = None) -> None:
        for p in list(self.by_partition) if partitions is None else partitions:
            self.by_partition.pop(p, None)

    def totals(self) -> dict[tuple[str, str], int]:
        out: Counter[str] = Counter()
        for c in self.by_partition.values():
            out.update(c)
        return {(k.split(SEP, 1)[0], k.split(SEP, 1)[1]): v for k, v in out.items() if v > 0}
