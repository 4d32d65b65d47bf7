"""The durable per-user timer: an ordered scan of the timer index by due time.

The index (`t:<due><user>` keys, see agents.keys) lives in the journey state table's RocksDB,
beside the records whose wake-up times it orders (a restore rebuilds it from them). Every
interval the pipeline asks the scanner for each active partition's due timers, from its cursor
up to min(now - grace, the partition's event-time gate, see agents.align), oldest first, and
applies them as Tick inputs in its next batch: serialised with that user's other inputs, written
in one batch that also deletes the index entries. A tick with nothing due is a no-op, so a timer
scanned again after a crash cannot send twice.

The index in the store is as of the last checkpoint (agents.pipeline); the changes of the
batches applied since (`unwritten`, one dict per checkpoint not yet written, oldest first) are
merged into the scan, so a timer is found from the batch that set it on, and one cleared since is
not fired.

Bounded: at most `fire_limit` timers per partition per scan, so a backlog of overdue timers
(after downtime) drains steadily, oldest first, without starving event processing. The cursor
avoids re-reading deleted (fired) keys, which is what keeps seeks cheap after many timers fired.
"""

from __future__ import annotations

import contextlib
import heapq
import math
from collections.abc import Callable, Iterable, Iterator
from typing import Protocol

from nudgeflow.agents import metrics
from nudgeflow.agents.keys import TIMER, parse_timer_key, timer_key


class TimerIndex(Protocol):
    def keys_from(self, partition: int, start: bytes, prefix: bytes) -> Iterator[bytes]: ...


class TimerScanner:
    def __init__(self, index: TimerIndex, grace_ms: int, fire_limit: int) -> None:
        self.index, self.grace_ms, self.fire_limit = index, grace_ms, fire_limit
        self.cursor: dict[int, bytes] = {}
        self.pending: dict[int, int] = {}
        # per checkpoint not yet written, oldest first: partition -> index key -> b"1" (set) or None
        self.unwritten: list[dict[int, dict[bytes, bytes | None]]] = []

    @property
    def partitions(self) -> list[int]:
        return sorted(self.cursor)

    def assign(self, partitions: set[int]) -> None:
        for p in sorted(partitions):
            self.cursor[p] = TIMER
            self.pending[p] = self._count(p)
            metrics.PENDING_TIMERS.labels(str(p)).set(self.pending[p])

    def revoke(self, partitions: set[int]) -> None:
        for p in partitions:
            self.cursor.pop(p, None)
            self.pending.pop(p, None)
            with contextlib.suppress(KeyError):  # never set for this partition
                metrics.PENDING_TIMERS.remove(str(p))

    def _count(self, p: int) -> int:
        return sum(1 for _ in self.index.keys_from(p, TIMER, TIMER))

    def rewind(self, p: int, due: int) -> None:
        """A timer was set earlier than the cursor (a late event): scan from there again."""
        if p in self.cursor:
            key = timer_key(due, "")
            if key < self.cursor[p]:
                self.cursor[p] = key

    def applied(self, p: int, set_n: int, cleared_n: int) -> None:
        if p in self.pending:
            self.pending[p] += set_n - cleared_n
            metrics.PENDING_TIMERS.labels(str(p)).set(self.pending[p])

    def collect_due(self, now_ms: int, gate: Callable[[int], float] | None = None) -> list[tuple[int, int, str]]:
        """(partition, due, user) of due timers, oldest first, at most `fire_limit` per partition.
        `gate(p)` caps the due times that may fire on partition p (see event_time_gate)."""
        out: list[tuple[int, int, str]] = []
        for p in self.partitions:
            limit_due = min(now_ms - self.grace_ms, gate(p) if gate else float("inf"))
            if limit_due < 0:
                continue  # nothing can be due yet (an input not read: the gate is -inf)
            keys: Iterable[bytes] = self.index.keys_from(p, self.cursor[p], TIMER)
            changed = self._changed(p)
            if changed:
                # the unwritten changes decide their keys; the ones set that may be due join the
                # store's keys in order
                start = self.cursor[p]
                end = timer_key(math.floor(limit_due) + 1, "") if limit_due != float("inf") else b"\xff"
                ahead = sorted([k for k, v in changed.items() if v is not None and start <= k < end])
                keys = heapq.merge((k for k in keys if k not in changed), ahead)
            for n, key in enumerate(keys):
                due, user = parse_timer_key(key)
                if n >= self.fire_limit or due > limit_due:
                    break
                out.append((p, due, user))
                self.cursor[p] = key + b"\x00"  # the next possible key after this one
        if out:
            metrics.TICKS_EMITTED.inc(len(out))
        return out

    def _changed(self, p: int) -> dict[bytes, bytes | None] | None:
        """Partition p's index changes not yet in the store, the newest per key."""
        layers = [d for layer in self.unwritten if (d := layer.get(p))]
        if len(layers) <= 1:
            return layers[0] if layers else None
        merged: dict[bytes, bytes | None] = {}
        for d in layers:
            merged.update(d)
        return merged
