"""A checkpoint (agents.pipeline) takes batches' state changes, the newest per key, and orders its
changelog records as one batch would: user records, then counts and cursors, positions last."""

from __future__ import annotations

from nudgeflow.agents.batch import BatchOutput
from nudgeflow.agents.keys import position_key, user_key
from nudgeflow.agents.occupancy import OCCUPANCY
from nudgeflow.agents.pipeline import Checkpoint


def test_later_batches_win_and_user_records_come_before_counts_cursors_and_positions() -> None:
    first = BatchOutput(
        writes={0: [(user_key("a"), b"a1"), (OCCUPANCY, b"c1"), (b"m:scan", b"s1")]},
        local={0: [(b"t:1a", b"1")]},
        positions={("add_to_cart", 0): 10},
    )
    second = BatchOutput(
        writes={0: [(user_key("b"), b"b2"), (user_key("a"), b"a2"), (OCCUPANCY, b"c2")], 1: [(user_key("c"), b"c")]},
        local={0: [(b"t:1a", None), (b"t:2a", b"1")]},
        positions={("add_to_cart", 0): 25, ("charged", 1): 3},
    )
    ck = Checkpoint()
    ck.absorb(first)
    ck.absorb(second)
    assert first.writes == {} == second.local  # handed over
    ck.close()
    assert list(ck.writes[0].items()) == [
        (user_key("a"), b"a2"),
        (user_key("b"), b"b2"),
        (OCCUPANCY, b"c2"),
        (b"m:scan", b"s1"),
        (position_key("add_to_cart"), b"25"),
    ]
    assert list(ck.writes[1].items()) == [(user_key("c"), b"c"), (position_key("charged"), b"3")]
    assert ck.local == {0: {b"t:2a": b"1"}}  # t:1a, set and cleared here, nets out


def test_timer_entries_set_and_cleared_within_a_checkpoint_leave_nothing_to_write() -> None:
    ck = Checkpoint()
    # the store holds t:1a (a wake-up from before); the user's entry moves 1 -> 2 -> 3 -> 2, then
    # user b's entry is set and cleared, set again, and user c's cleared only
    ck.absorb(BatchOutput(local={0: [(b"t:1a", None), (b"t:2a", b"1")]}))
    ck.absorb(BatchOutput(local={0: [(b"t:2a", None), (b"t:3a", b"1"), (b"t:5b", b"1")]}))
    ck.absorb(BatchOutput(local={0: [(b"t:3a", None), (b"t:2a", b"1"), (b"t:5b", None), (b"t:9c", None)]}))
    assert ck.local == {0: {b"t:1a": None, b"t:2a": b"1", b"t:9c": None}}
    ck.absorb(BatchOutput(local={0: [(b"t:5b", b"1"), (b"t:1a", b"1")], 1: [(b"t:4d", b"1")]}))
    ck.absorb(BatchOutput(local={0: [(b"t:1a", None)], 1: [(b"t:4d", None)]}))
    # t:1a was in the store: its clearing stays, whatever happened to it in between
    assert ck.local == {0: {b"t:1a": None, b"t:2a": b"1", b"t:9c": None, b"t:5b": b"1"}, 1: {}}
