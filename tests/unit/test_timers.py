"""The timer scanner: due timers oldest first, from the store's index merged with the index
changes of checkpoints not yet written (agents.pipeline)."""

from __future__ import annotations

from collections.abc import Iterator

from nudgeflow.agents.keys import timer_key
from nudgeflow.agents.timers import TimerScanner


class Index:
    def __init__(self, keys: list[bytes]) -> None:
        self.keys = sorted(keys)

    def keys_from(self, partition: int, start: bytes, prefix: bytes) -> Iterator[bytes]:
        return (k for k in self.keys if k >= start and k.startswith(prefix))


def test_unwritten_changes_decide_their_keys_and_join_the_stores_in_due_order() -> None:
    store = Index([timer_key(10, "cleared"), timer_key(30, "stored"), timer_key(35, "moved")])
    scanner = TimerScanner(store, grace_ms=0, fire_limit=100)
    scanner.assign({0})
    assert scanner.pending == {0: 3}
    older = {0: {timer_key(10, "cleared"): None, timer_key(20, "new"): b"1", timer_key(35, "moved"): None}}
    newer = {0: {timer_key(36, "moved"): b"1", timer_key(20, "new"): None, timer_key(25, "newer"): b"1"}}
    scanner.unwritten += [older, newer]
    assert scanner.collect_due(40) == [(0, 25, "newer"), (0, 30, "stored"), (0, 36, "moved")]
    assert scanner.collect_due(40) == []  # the cursor moved past them
    newer[0][timer_key(38, "late")] = b"1"  # a later batch of the same checkpoint
    scanner.rewind(0, 38)
    assert scanner.collect_due(40) == [(0, 38, "late")]


def test_the_gate_and_the_fire_limit_bound_what_the_unwritten_changes_add() -> None:
    scanner = TimerScanner(Index([timer_key(5, "a")]), grace_ms=0, fire_limit=2)
    scanner.assign({0})
    scanner.unwritten.append({0: {timer_key(k, f"u{k}"): b"1" for k in (3, 7, 9, 50)}})
    assert scanner.collect_due(100, lambda p: float("-inf")) == []  # an input not read yet
    assert scanner.collect_due(100, lambda p: 8.5) == [(0, 3, "u3"), (0, 5, "a")]  # at most 2
    assert scanner.collect_due(100, lambda p: 8.5) == [(0, 7, "u7")]  # then the rest up to the gate
    assert scanner.collect_due(100) == [(0, 9, "u9"), (0, 50, "u50")]
