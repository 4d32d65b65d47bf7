"""Event-time alignment of the co-partitioned input topics, per partition.

Kafka keeps order within a topic-partition, not across topics: a consumer catching up can read
add_to_cart up to 10:05 while charged is still at 10:01. Applied in that order, a purchase
would land after a later add-to-cart and a push would go out to someone who bought. The aligner
releases, per partition, the input with the smallest event time, but only while every other
input topic of that partition either has a buffered input or has nothing left to read (its read
position is at its high watermark). That yields event-time order per user whatever the fetch
order, and costs nothing once caught up (every topic is then at its high watermark).

Inputs from the ticks and feedback topics are not event time and pass straight through. A
bounded number of held inputs per partition (`max_held`) keeps a stalled topic from holding
everything: past it, inputs are released in time order anyway (counted as forced).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable
from typing import Any, Generic, TypeVar

H = TypeVar("H")


class Aligner(Generic[H]):
    def __init__(self, event_topics: Iterable[str], max_held: int = 50_000) -> None:
        self.event_topics = tuple(event_topics)
        self.max_held = max_held
        self.bufs: dict[int, dict[str, deque[tuple[int, int, H]]]] = {}
        self.read_upto: dict[tuple[str, int], int] = {}  # next offset after the last one added
        self.held = 0
        self.forced = 0
        self._seq = 0

    def add(self, topic: str, partition: int, offset: int, at: int, item: H) -> list[H]:
        """Buffer an input; inputs of non-event topics come straight back (released)."""
        if topic not in self.event_topics:
            return [item]
        bufs = self.bufs.setdefault(partition, {t: deque() for t in self.event_topics})
        self._seq += 1
        bufs[topic].append((at, self._seq, item))
        self.held += 1
        return []

    def note_read(self, topic: str, partition: int, offset: int) -> None:
        """A message was read (buffered, dropped or dead-lettered alike): the read position moves."""
        self.read_upto[(topic, partition)] = max(self.read_upto.get((topic, partition), 0), offset + 1)

    def release(self, lagging: Callable[[str, int], bool]) -> list[H]:
        """Everything that can go now, in event-time order per partition.

        `lagging(topic, partition)` says whether the topic-partition has offsets left to read."""
        out: list[H] = []
        for p, bufs in self.bufs.items():
            n_held = sum(len(q) for q in bufs.values())
            while n_held:
                _, _, topic = min((q[0][0], q[0][1], t) for t, q in bufs.items() if q)
                blocked = any(not bufs[t] and lagging(t, p) for t in self.event_topics if t != topic)
                if blocked:
                    if n_held <= self.max_held:
                        break
                    self.forced += 1
                out.append(bufs[topic].popleft()[2])
                n_held -= 1
                self.held -= 1
        return out

    def holding(self, topic: str, partition: int) -> bool:
        bufs = self.bufs.get(partition)
        return bool(bufs and bufs.get(topic))

    def drop(self, partitions: Iterable[int]) -> list[Any]:
        """Forget held inputs of revoked partitions (the new owner reads them again)."""
        dropped: list[Any] = []
        for p in partitions:
            for q in self.bufs.pop(p, {}).values():
                dropped.extend(item for _, _, item in q)
            for key in [k for k in self.read_upto if k[1] == p]:
                del self.read_upto[key]
        self.held -= len(dropped)
        return dropped
