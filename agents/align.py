"""Event-time order across the co-partitioned input topics, per partition, and the timer gate.

Kafka keeps order within a topic-partition, not across topics: a consumer catching up can read
add_to_cart up to 10:05 while charged is still at 10:01. Applied in that order, a purchase would
land after a later add-to-cart and a push would go out to someone who bought. So the aligner
holds each partition's inputs and releases the one with the smallest event time once no other
input topic of that partition can still deliver an earlier one, which is when that topic

- has an input buffered (its head is not earlier, or it would be the smallest), or
- has already delivered an input at least as late (each topic-partition is in time order; at
  equal times, topics go in the order given), or
- is *quiet*: read up to its end (partition EOF, and the latest fetch answer's high watermark
  says nothing more is there: librdkafka fetches ahead of what the loop has read) and nothing
  new for `idle_ms`, while its leader broker kept answering (`heard`): the silence of a frozen
  or unreachable broker is no news, and when it answers again, producers are still sending
  what they held meanwhile.

The same knowledge gates timers: a timer of partition p may fire once every input topic of p is
past its due time or quiet (`gate`), a quiet topic only as far as the time its leader broker
last answered a fetch (`heard`): the answer that said "nothing more" holds what reached the
broker before it, nothing after. A frozen or unreachable broker's silence therefore holds
timers back instead of letting them run ahead of inputs its producers could not send.
Catching up after downtime, a push therefore waits until the purchase made meanwhile is read;
live, inputs are quiet or at the present and timers follow the wall clock (as of the brokers'
last answers: a fetch waits up to 500 ms for news, statistics come every 250 ms); with event
times far behind the wall clock (a replay, the benchmark's synthetic input), timers follow the
input's event time exactly. README "How it stays correct" states the rule. Both are exact when
each input partition is in event-time order. Feedback (not event time) passes straight through
and does not move a user's journey time (engine.core.apply).

Memory stays bounded without giving up the order: once a partition holds more than `max_held`
inputs, the topics it holds inputs of are paused (`to_pause`; the reader stops fetching them),
and resumed once it holds less than half as many, so the lagging topic catches up first.
Inputs of other topics (feedback, call results) are not event time and pass straight through.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from nudgeflow.agents.batch import Item

NEVER = float("-inf")


@dataclass(slots=True)
class Progress:
    """How far one input topic-partition has been read."""

    read_upto: int = -1  # next offset after the last message read; -1: none read since assignment
    at_end: bool = False  # the last fetch reported nothing beyond read_upto (partition EOF)
    last_read: float = 0.0  # monotonic time of the last message (or of the assignment)
    newest: float = NEVER  # the latest event time read


class Aligner:
    def __init__(
        self,
        event_topics: Iterable[str],
        idle_ms: int = 500,
        max_held: int = 20_000,
        clock: Callable[[], float] = time.monotonic,
        high_watermark: Callable[[str, int], int | None] = lambda topic, p: None,
        heard: Callable[[str, int], tuple[float, float] | None] = lambda topic, p: (NEVER, float("inf")),
    ) -> None:
        self.event_topics = tuple(event_topics)  # in this order for equal event times
        self._event_topic_set = frozenset(self.event_topics)
        self._index = {t: i for i, t in enumerate(self.event_topics)}
        self.idle_s, self.max_held, self.clock = idle_ms / 1000, max_held, clock
        # the end of a topic-partition per the latest fetch answer (librdkafka fetches ahead of
        # what was handed over, so this knows of new input before the loop reads it)
        self.high_watermark = high_watermark
        # (answering without a gap since, last answer), epoch ms, of the topic-partition's leader;
        # None: not answering, or not known yet
        self.heard = heard
        self.bufs: dict[int, dict[str, deque[Item]]] = {}
        self.progress: dict[tuple[str, int], Progress] = {}
        self.held = 0
        self.held_in: dict[int, int] = {}  # partition -> inputs held
        self.paused: set[tuple[str, int]] = set()  # topic-partitions the reader was asked to pause

    def track(self, partitions: Iterable[int], topics: Iterable[str]) -> None:
        """Start following these topic-partitions (just assigned): nothing read yet."""
        now = self.clock()
        topics = list(topics)
        for p in partitions:
            self.bufs[p] = {t: deque() for t in self.event_topics}
            self.held_in[p] = 0
            for t in topics:
                self.progress[(t, p)] = Progress(last_read=now)

    def reset(self) -> None:
        """Forget everything (a rebalance): held inputs are read again from their positions."""
        self.bufs.clear()
        self.progress.clear()
        self.held_in.clear()
        self.paused.clear()
        self.held = 0

    def note_read(self, topic: str, partition: int, offset: int, now: float) -> None:
        """A message was read (buffered, dropped or dead-lettered alike): the read position moves.
        Note a fetch's messages before its EOF events (`note_end`)."""
        pr = self.progress.get((topic, partition))
        if pr is not None:
            pr.last_read = now
            if offset >= pr.read_upto:
                pr.read_upto, pr.at_end = offset + 1, False

    def note_reads(self, last: dict[tuple[str, int], int]) -> None:
        """note_read for the last message of each topic-partition of a fetch."""
        now = self.clock()
        for (topic, p), offset in last.items():
            self.note_read(topic, p, offset, now)

    def note_times(self, newest: dict[tuple[str, int], int]) -> None:
        """Event times read but not held (events no journey uses): how far those topics have got."""
        for key, at in newest.items():
            pr = self.progress.get(key)
            if pr is not None and at > pr.newest:
                pr.newest = at

    def note_end(self, topic: str, partition: int, offset: int) -> None:
        """The fetch reached the partition's end (EOF at `offset`)."""
        pr = self.progress.get((topic, partition))
        if pr is not None and offset >= pr.read_upto:
            pr.at_end = True
            pr.read_upto = max(pr.read_upto, offset)

    def add(self, item: Item) -> bool:
        """Hold an input of an event topic (True); inputs of other topics are not held (False)."""
        return not self.add_all([item])

    def add_all(self, items: Iterable[Item]) -> list[Item]:
        """`add` each input (a fetch's worth, in one call); those not held, in their order."""
        all_bufs, topics, progress, held_in = self.bufs, self._event_topic_set, self.progress, self.held_in
        rest: list[Item] = []
        held = 0
        for item in items:
            p, topic = item.partition, item.topic
            bufs = all_bufs.get(p)
            if bufs is None or topic not in topics:
                rest.append(item)
                continue
            bufs[topic].append(item)
            pr = progress.get((topic, p))
            if pr is not None and item.at > pr.newest:
                pr.newest = item.at
            held += 1
            held_in[p] += 1
        self.held += held
        return rest

    def _open_bound(self, topic: str, p: int, now: float, timers: bool = False) -> float:
        """For a topic of partition p with nothing buffered: no input earlier than this can still
        arrive from it. When it is quiet: +inf for inputs; for timers, the time its broker last
        answered (or the latest input it delivered, if later)."""
        pr = self.progress.get((topic, p))
        if pr is None:
            return float("inf")
        if pr.at_end and now - pr.last_read >= self.idle_s:
            hw = self.high_watermark(topic, p)
            if hw is None or hw <= pr.read_upto:  # nothing fetched beyond what was read
                heard = self.heard(topic, p)
                if heard is not None and heard[1] - heard[0] >= self.idle_s * 1000:  # from an answering broker
                    return max(heard[1], pr.newest) if timers else float("inf")
        return pr.newest

    def release(self) -> list[Item]:
        """Everything that can go now, in (event time, topic order) per partition: inputs of equal
        time go in the order of `event_topics`, so the order never depends on fetch timing."""
        out: list[Item] = []
        now, index = self.clock(), self._index
        for p, bufs in self.bufs.items():
            full = [q for q in bufs.values() if q]
            if not full:
                continue
            limit = (float("inf"), 0)  # the earliest (time, topic) an open topic may still deliver
            for t, q in bufs.items():
                if not q and (bound := (self._open_bound(t, p, now), index[t])) < limit:
                    limit = bound
            released = 0
            while full:  # a k-way merge by (time, topic order), a run of one queue at a time
                if len(full) == 1:
                    q, until = full[0], limit
                elif len(full) == 2:  # the common case (carts and purchases): half the cost of the general one
                    a, b = full
                    ka, kb = (a[0].at, index[a[0].topic]), (b[0].at, index[b[0].topic])
                    q, other = (a, kb) if ka < kb else (b, ka)
                    until = other if other < limit else limit
                else:
                    q = min(full, key=self._head_key)
                    until = min(min(self._head_key(o) for o in full if o is not q), limit)
                topic = q[0].topic
                # (at, index[topic]) <= until, for this queue's fixed topic: at <= last
                last = until[0] if index[topic] <= until[1] else until[0] - 1
                n = 0
                while q and q[0].at <= last:
                    out.append(q.popleft())
                    n += 1
                released += n
                if not q:
                    full.remove(q)
                    if (bound := (self._open_bound(topic, p, now), index[topic])) < limit:
                        limit = bound
                elif n == 0:  # the earliest head is past what may go
                    break
            self.held -= released
            self.held_in[p] -= released
        return out

    def _head_key(self, q: deque[Item]) -> tuple[int, int]:
        return q[0].at, self._index[q[0].topic]

    def flow(self) -> tuple[list[tuple[str, int]], list[tuple[str, int]]]:
        """(topic-partitions to pause, to resume). A partition holding more than `max_held` inputs
        pauses the topics it holds inputs of, until it is down to half as many; a paused topic
        whose inputs have all gone is resumed at once, since it may be the one the rest waits for."""
        pause, resume = [], []
        for p, n in self.held_in.items():
            bufs = self.bufs[p]
            for t, q in bufs.items():
                tp = (t, p)
                if tp in self.paused:
                    if not q or n <= self.max_held // 2:
                        resume.append(tp)
                elif q and n > self.max_held:
                    pause.append(tp)
        self.paused.update(pause)
        self.paused.difference_update(resume)
        return pause, resume

    def gate(self, p: int) -> float:
        """The latest due time that may fire on partition p: every input earlier than it has been
        applied, and none can still arrive (see the module docstring)."""
        bufs = self.bufs.get(p)
        if bufs is None:
            return NEVER
        now = self.clock()
        gate = float("inf")
        for t, q in bufs.items():
            bound = q[0].at if q else self._open_bound(t, p, now, timers=True)
            if bound < gate:
                gate = bound
        return gate

    def holding(self, topic: str, partition: int) -> bool:
        bufs = self.bufs.get(partition)
        return bool(bufs and bufs.get(topic))

    def position(self, topic: str, partition: int) -> int | None:
        """Where this topic-partition resumes after everything released so far is durable: the
        first held input, or past the last message read; None when nothing was read."""
        bufs = self.bufs.get(partition)
        q = bufs.get(topic) if bufs else None
        if q:
            return q[0].offset
        pr = self.progress.get((topic, partition))
        return pr.read_upto if pr is not None and pr.read_upto >= 0 else None
