"""The event-time aligner: per-partition time order across topics, held while a topic lags."""

from nudgeflow.agents.align import Aligner

TOPICS = ("add_to_cart", "charged")


def test_releases_in_time_order_across_topics_once_nothing_lags() -> None:
    a: Aligner[str] = Aligner(TOPICS)
    for off, ts in enumerate((100, 300, 500)):
        assert a.add("add_to_cart", 0, off, ts, f"a{ts}") == []
    a.add("charged", 0, 0, 200, "c200")
    # charged has more to read: only what is older than its buffered head may go
    lag = {("charged", 0): True, ("add_to_cart", 0): False}
    assert a.release(lambda t, p: lag[(t, p)]) == ["a100", "c200"]
    # nothing buffered for charged and it still lags: a300 must wait
    assert a.release(lambda t, p: lag[(t, p)]) == []
    a.add("charged", 0, 1, 400, "c400")
    lag[("charged", 0)] = False
    assert a.release(lambda t, p: lag[(t, p)]) == ["a300", "c400", "a500"]
    assert a.held == 0


def test_partitions_are_independent_and_other_topics_pass_through() -> None:
    a: Aligner[str] = Aligner(TOPICS)
    a.add("add_to_cart", 0, 0, 100, "p0")
    a.add("add_to_cart", 1, 0, 100, "p1")
    assert a.add("nudgeflow.ticks", 0, 0, 999, "tick") == ["tick"]
    assert a.release(lambda t, p: p == 0) == ["p1"]  # partition 0's charged lags


def test_a_stalled_topic_cannot_hold_more_than_max_held() -> None:
    a: Aligner[int] = Aligner(TOPICS, max_held=2)
    for i in range(5):
        a.add("add_to_cart", 0, i, i, i)
    assert a.release(lambda t, p: True) == [0, 1, 2]
    assert a.forced == 3 and a.held == 2


def test_drop_forgets_revoked_partitions() -> None:
    a: Aligner[str] = Aligner(TOPICS)
    a.add("add_to_cart", 3, 0, 1, "x")
    assert a.drop([3]) == ["x"] and a.held == 0 and a.release(lambda t, p: False) == []
