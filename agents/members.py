"""Current members of a segment enter a journey when it activates (`include_current_members`).

A `segment_entered` journey normally admits users as their membership flips. With
`include_current_members: true`, the users already in the segment when the journey (or a new
version of it) activates enter too. The worker does that by walking each of its partitions' user
records in key order, at most `member_scan_rate` users per second over all its partitions (paced:
the hot path keeps its pace), and applying a MemberCheck input for each; the engine enters those in the segment once per
activation (the user's entry history notes which one admitted them, so a repeated slice admits
nobody twice).

The scan's cursor is a key of the partition's store, `s:<journey>@<version>:<digest>` -> the last
user key checked (or DONE), written with the batch that applied the slice, to RocksDB and to the
changelog: a worker that restarts, or takes the partition over, carries on where the last one
stopped. A journey with `starts_at` is scanned from then on; a paused one when it is active again.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Protocol

from nudgeflow.agents import metrics
from nudgeflow.agents.keys import USER
from nudgeflow.engine.graph import JourneySet

SCAN = b"s:"
DONE = b"\xff"

Write = tuple[bytes, bytes | None]


class UserKeys(Protocol):
    def keys_from(self, partition: int, start: bytes, prefix: bytes) -> Iterator[bytes]: ...

    def get_many(self, partition: int, keys: list[bytes]) -> list[bytes | None]: ...


def scan_key(journey: str, activation: str) -> bytes:
    return SCAN + f"{journey}@{activation}".encode()


class MemberScanner:
    def __init__(self, store: UserKeys, journeys: JourneySet, rate_per_s: int) -> None:
        self.store, self.rate = store, rate_per_s
        self.last_ms: int | None = None
        self.activations = {
            scan_key(j.id, j.activation): (j.id, j.entry.starts_at)
            for j in journeys.journeys.values()
            if j.entry.include_current_members and j.status == "active"
        }
        self.cursor: dict[int, dict[bytes, bytes]] = {}  # partition -> scan key -> next user key

    @property
    def active(self) -> bool:
        return any(self.cursor.values())

    def assign(self, partitions: set[int]) -> None:
        keys = list(self.activations)
        for p in sorted(partitions):
            stored = self.store.get_many(p, keys) if keys else []
            self.cursor[p] = {
                k: USER if v is None else v + b"\x00" for k, v in zip(keys, stored, strict=True) if v != DONE
            }
        self._gauge()

    def revoke(self, partitions: set[int]) -> None:
        for p in partitions:
            self.cursor.pop(p, None)
        self._gauge()

    def _gauge(self) -> None:
        left: dict[str, int] = dict.fromkeys((jid for jid, _ in self.activations.values()), 0)
        for scans in self.cursor.values():
            for key in scans:
                left[self.activations[key][0]] += 1
        for jid, n in left.items():
            metrics.MEMBER_SCANS_RUNNING.labels(jid).set(n)

    def collect(
        self, now_ms: int, gate: Callable[[int], float]
    ) -> tuple[list[tuple[int, str, str, int]], dict[int, list[Write]]]:
        """The next slice of every running scan: (partition, user, journey, at) checks and the
        cursor writes to make durable with them. `at` is the journey time of the check: now, but
        never ahead of what the partition's inputs have reached (`gate`, agents.align)."""
        checks: list[tuple[int, str, str, int]] = []
        writes: dict[int, list[Write]] = {}
        elapsed = 1000 if self.last_ms is None else min(1000, max(0, now_ms - self.last_ms))
        self.last_ms = now_ms
        running = sum(len(s) for s in self.cursor.values())
        per_scan = max(1, self.rate * elapsed // 1000 // max(1, running))
        for p, scans in self.cursor.items():
            g = gate(p)
            if g == float("-inf"):
                continue  # an input not read yet: no journey time to check at
            at = int(min(now_ms, g))
            for key, start in list(scans.items()):
                jid, starts_at = self.activations[key]
                if starts_at is not None and at < starts_at:
                    continue
                users = []
                for ukey in self.store.keys_from(p, start, USER):
                    users.append(ukey)
                    if len(users) >= per_scan:
                        break
                checks += [(p, u[len(USER) :].decode(), jid, at) for u in users]
                metrics.MEMBER_SCAN.labels(jid, "checked").inc(len(users))
                if len(users) < per_scan:
                    writes.setdefault(p, []).append((key, DONE))
                    del scans[key]
                else:
                    writes.setdefault(p, []).append((key, users[-1]))
                    scans[key] = users[-1] + b"\x00"
        if writes:
            self._gauge()
        return checks, writes
