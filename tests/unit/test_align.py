"""The event-time aligner: per-partition time order across topics, and the timer gate."""

from __future__ import annotations

import orjson
import pytest

from nudgeflow.agents.align import Aligner
from nudgeflow.agents.batch import Item
from nudgeflow.engine.io import Event

TOPICS = ("add_to_cart", "charged")


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def aligner(clock: Clock, max_held: int = 100) -> Aligner:
    a = Aligner(TOPICS, idle_ms=500, max_held=max_held, clock=clock)
    a.track([0, 1], TOPICS)
    return a


def add(a: Aligner, topic: str, offset: int, at: int, p: int = 0) -> bool:
    a.note_read(topic, p, offset, a.clock())
    return a.add(Item(topic, p, offset, Event("u", topic, at), at))


def names(items: list[Item]) -> list[str]:
    return [f"{i.topic[0]}{i.at}" for i in items]


def test_releases_in_time_order_once_no_other_topic_can_deliver_an_earlier_input() -> None:
    clock = Clock()
    a = aligner(clock)
    for off, ts in enumerate((100, 300, 500)):
        assert add(a, "add_to_cart", off, ts)
    assert a.release() == []  # charged has delivered nothing and is not known to be at its end
    add(a, "charged", 0, 200)
    # charged's later inputs are not earlier than 200 (each topic-partition is in time order)
    assert names(a.release()) == ["a100", "c200"]
    add(a, "charged", 1, 400)
    assert names(a.release()) == ["a300", "c400"]
    assert a.held == 1 and a.position("add_to_cart", 0) == 2 and a.position("charged", 0) == 2


def test_a_quiet_topic_holds_nothing_back_but_a_topic_just_read_to_its_end_does() -> None:
    clock = Clock()
    a = aligner(clock)
    add(a, "add_to_cart", 0, 100)
    a.note_end("charged", 0, 0)  # empty, read to its end: maybe something arrives right now
    assert a.release() == []
    clock.now += 0.6  # nothing new for longer than idle_ms: quiet
    assert names(a.release()) == ["a100"]
    assert a.gate(0) == 100  # add_to_cart may still deliver something from 100 on
    a.note_end("add_to_cart", 0, 1)
    clock.now += 0.6
    assert a.gate(0) == float("inf")  # everything quiet: timers follow the wall clock


def test_timers_wait_for_every_input_to_pass_their_due_time() -> None:
    clock = Clock()
    a = aligner(clock)
    assert a.gate(0) == float("-inf")  # nothing read yet: hold every timer
    add(a, "add_to_cart", 0, 100)
    add(a, "charged", 0, 250)
    a.release()
    assert a.gate(0) == 100  # add_to_cart has delivered up to 100 only
    add(a, "add_to_cart", 1, 300)
    assert names(a.release()) == ["c250"]  # a300 waits for charged
    assert a.gate(0) == 250
    a.note_end("add_to_cart", 0, 2)
    a.note_end("charged", 0, 1)
    clock.now += 1
    assert names(a.release()) == ["a300"] and a.gate(0) == float("inf")


def test_partitions_are_independent_and_other_topics_pass_through() -> None:
    clock = Clock()
    a = aligner(clock)
    add(a, "add_to_cart", 0, 100, p=0)
    add(a, "add_to_cart", 0, 100, p=1)
    add(a, "charged", 0, 150, p=1)
    assert not a.add(Item("nudgeflow.feedback", 0, 0, Event("u", "x", 1), 1))
    assert [(i.partition, i.at) for i in a.release()] == [(1, 100)]  # partition 0's charged may lag


def test_a_partition_holding_too_much_pauses_the_topics_ahead_until_half_is_released() -> None:
    clock = Clock()
    a = aligner(clock, max_held=4)
    for off in range(6):
        add(a, "add_to_cart", off, 100 + off)
    assert a.release() == [] and a.flow() == ([("add_to_cart", 0)], [])
    assert a.flow() == ([], [])  # asked once
    add(a, "charged", 0, 103)
    assert names(a.release()) == ["a100", "a101", "a102", "a103", "c103"] and a.held == 2
    assert a.flow() == ([], [("add_to_cart", 0)])


def test_a_paused_topic_that_has_nothing_held_is_resumed_it_may_be_the_one_the_rest_waits_for() -> None:
    clock = Clock()
    a = aligner(clock, max_held=4)
    add(a, "charged", 0, 100)
    for off in range(5):
        add(a, "add_to_cart", off, 101 + off)
    assert a.flow() == ([("add_to_cart", 0), ("charged", 0)], [])  # both hold inputs
    assert names(a.release()) == ["c100"]  # charged emptied; add_to_cart now waits for it
    assert a.flow() == ([], [("charged", 0)])  # so charged must be read again


def test_reset_forgets_held_inputs_and_positions() -> None:
    clock = Clock()
    a = aligner(clock)
    add(a, "add_to_cart", 7, 1)
    a.reset()
    assert a.held == 0 and a.release() == [] and a.position("add_to_cart", 0) is None


def test_a_topic_whose_fetch_knows_of_more_input_is_not_quiet_however_long_the_loop_took() -> None:
    clock, ends = Clock(), {("charged", 0): 1}
    a = Aligner(TOPICS, idle_ms=500, clock=clock, high_watermark=lambda t, p: ends.get((t, p)))
    a.track([0], TOPICS)
    a.note_end("add_to_cart", 0, 0)
    clock.now += 1  # add_to_cart quiet (and empty)
    add(a, "charged", 0, 100)
    assert names(a.release()) == ["c100"]
    a.note_end("charged", 0, 1)
    add(a, "add_to_cart", 0, 300)
    clock.now += 2  # the loop was busy: no message of charged read for two seconds
    ends[("charged", 0)] = 5  # but librdkafka has fetched more of it meanwhile
    assert a.release() == [] and a.gate(0) == 100
    ends[("charged", 0)] = 1
    assert names(a.release()) == ["a300"]


def test_a_fetch_that_reads_a_topic_to_its_end_starts_its_quiet_time_afresh() -> None:
    clock = Clock()
    a = aligner(clock)
    add(a, "charged", 0, 50)
    a.note_end("add_to_cart", 0, 0)
    clock.now += 1
    assert names(a.release()) == ["c50"]
    clock.now += 5  # nothing read for a while, then one fetch brings a message and the end
    a.note_reads({("charged", 0): 1})
    a.note_end("charged", 0, 2)
    add(a, "add_to_cart", 0, 300)
    assert a.release() == []  # charged was read just now: not quiet yet
    clock.now += 0.6
    assert names(a.release()) == ["a300"]


def test_a_busy_topic_whose_events_no_journey_uses_does_not_hold_the_others() -> None:
    """page_viewed flows all the time and is dropped before the aligner (no journey uses it): its
    event times, noted as read, let add_to_cart through without waiting for it to be quiet."""
    from nudgeflow.agents.batch import BatchCore, BatchOutput
    from nudgeflow.streams.events import Decoder
    from nudgeflow.streams.topics import Topics
    from tests.unit.journeys import T0, seeds
    from tests.unit.test_batch import cart, msg

    core = BatchCore(seeds("clevertap-cart-inaction.yaml"), Topics(), Decoder(), clock=lambda: T0 / 1000 + 60)
    now = [1000.0]
    al = Aligner(Topics().user_inputs, idle_ms=500, clock=lambda: now[0])
    al.track([0], Topics().user_inputs)
    out = BatchOutput()
    fetch = [msg("page_viewed", 0, {"user_id": "u", "ts": T0 + 5}), cart("u", 0, ts=T0)]
    for item in core.decode(fetch, out):
        al.add(item)
    al.note_reads(out.read)
    al.note_times(out.dropped_upto)
    for t in ("charged", "custom_events", "user_profiles"):  # the others: read to their (empty) end
        al.note_end(t, 0, 0)
    now[0] += 1  # the empty ones are quiet now; page_viewed was just read (it never is quiet)
    assert [i.topic for i in al.release()] == ["add_to_cart"]


@pytest.mark.parametrize("topics", [TOPICS, ("add_to_cart", "charged", "custom_events")])
def test_random_interleavings_release_one_merge_in_time_then_topic_order(topics: tuple[str, ...]) -> None:
    import random

    rng = random.Random(7)
    for _ in range(200):
        clock = Clock()
        a = Aligner(topics, idle_ms=500, max_held=100, clock=clock)
        a.track([0, 1], topics)
        times = {t: sorted(rng.randrange(50) for _ in range(rng.randrange(1, 30))) for t in topics}
        pending = [(t, off, at) for t in topics for off, at in enumerate(times[t])]
        cursor = dict.fromkeys(topics, 0)
        released: list[Item] = []
        while any(cursor[t] < len(times[t]) for t in topics):
            t = rng.choice([t for t in topics if cursor[t] < len(times[t])])
            for _ in range(rng.randrange(1, 5)):  # a fetch: the next few of one topic
                if cursor[t] < len(times[t]):
                    add(a, t, cursor[t], times[t][cursor[t]])
                    cursor[t] += 1
            released += a.release()
        for t in topics:
            a.note_end(t, 0, len(times[t]))
        clock.now += 1
        released += a.release()
        assert a.held == 0
        got = [(i.at, topics.index(i.topic), i.offset) for i in released]
        assert got == sorted((at, topics.index(t), off) for t, off, at in pending)


def test_a_quiet_topic_lets_timers_fire_only_up_to_its_brokers_last_answer() -> None:
    """A frozen or unreachable broker sends no EOF and no new watermark: what the loop last heard
    says "nothing more", but producers are holding what they could not send. A quiet topic holds
    timers back to when its broker last answered (chaos check: a frozen broker)."""
    clock, heard = Clock(), {"add_to_cart": (0.0, 5_000.0), "charged": (0.0, 7_000.0)}
    a = Aligner(TOPICS, idle_ms=500, clock=clock, heard=lambda t, p: heard.get(t))
    a.track([0], TOPICS)
    add(a, "charged", 0, 6_000)
    assert names(a.release()) == []  # add_to_cart not read yet
    a.note_end("add_to_cart", 0, 0)
    a.note_end("charged", 0, 1)
    clock.now += 1
    assert names(a.release()) == ["c6000"]  # inputs are not held back by the broker's last answer
    assert a.gate(0) == 5_000  # add_to_cart's broker answered last at 5,000
    heard["add_to_cart"] = (0.0, 9_000.0)
    assert a.gate(0) == 7_000
    heard["charged"] = (0.0, 3_000.0)  # older than the input it delivered: that input bounds it
    assert a.gate(0) == 6_000
    del heard["add_to_cart"]  # not answering (or not known yet): not quiet
    assert a.gate(0) == float("-inf")


def test_a_broker_that_answers_again_must_answer_for_idle_ms_before_its_silence_means_quiet() -> None:
    """After a freeze the consumer's first answer may come before the producers' held batches
    land: a topic is quiet only once its broker has answered, with nothing new, for `idle_ms`."""
    clock, heard = Clock(), {"add_to_cart": (0.0, 10_000.0), "charged": (9_800.0, 10_000.0)}
    a = Aligner(TOPICS, idle_ms=500, clock=clock, heard=lambda t, p: heard.get(t))
    a.track([0], TOPICS)
    a.note_end("charged", 0, 0)
    add(a, "add_to_cart", 0, 9_000)
    a.note_end("add_to_cart", 0, 1)
    clock.now += 30  # long silence: the broker was frozen and has answered for 200 ms now
    assert names(a.release()) == [] and a.gate(0) == float("-inf")
    heard["charged"] = (9_800.0, 10_300.0)  # half a second of answers with nothing new: quiet
    assert names(a.release()) == ["a9000"] and a.gate(0) == 10_000


def test_the_input_reader_learns_from_librdkafkas_statistics_when_each_leader_last_answered() -> None:
    import time

    from nudgeflow.agents.inputs import InputReader

    reader = InputReader({"bootstrap.servers": "127.0.0.1:9"}, "g", 2**20, Aligner(TOPICS))
    try:

        def stats(rxidle_us: int, age_s: float = 0.0, waiting: int = 1) -> str:
            tp = {"topic": "charged", "partition": 0}
            ts = int((time.monotonic() - age_s) * 1e6)
            broker = {"nodeid": 1, "state": "UP", "rxidle": rxidle_us, "waitresp_cnt": waiting, "outbuf_cnt": 0}
            return orjson.dumps(
                {
                    "ts": ts,
                    "brokers": {
                        "b:9/1": {**broker, "toppars": {"charged-0": tp}},
                        "GroupCoordinator": {"nodeid": -1, "state": "UP", "rxidle": 10, "toppars": {}},
                    },
                }
            ).decode()

        def near(x: float, y: float) -> bool:
            return abs(x - y) < 100

        assert reader.heard("charged", 0) is None  # no statistics yet
        time.sleep(0.05)
        reader._on_stats(stats(10_000))
        first = reader.heard("charged", 0)
        # answering since the reader was made (no silence seen), last answered 10 ms ago
        assert first is not None and first[0] < first[1] and near(first[1], time.time() * 1000 - 10)
        assert reader.aligner.heard("charged", 0) == first
        assert reader.heard("add_to_cart", 0) is None  # a partition it does not lead
        reader._on_stats(stats(3_000_000, waiting=0))  # nothing asked for 3 s (the fetch queue full): no news
        assert reader.heard("charged", 0) is not None
        reader._on_stats(stats(2_000_000, age_s=20))  # taken 20 s ago: a request then waited 2 s unanswered
        assert reader.heard("charged", 0) is None  # silent: not answering
        time.sleep(0.05)
        reader._on_stats(stats(5_000))
        back = reader.heard("charged", 0)
        assert back is not None and back[0] == back[1] and back[0] > first[1]  # answering afresh since now
    finally:
        reader.close()
