"""The batch core (Faust-free): state writes, changelog order, DLQ records, replay dedupe."""

from __future__ import annotations

import orjson
import pytest

from nudgeflow.agents.batch import BatchCore, Message
from nudgeflow.agents.keys import parse_timer_key, user_key
from nudgeflow.streams.events import Decoder
from nudgeflow.streams.topics import Topics
from tests.unit.journeys import T0, M, seeds


class MemStore:
    def __init__(self) -> None:
        self.data: dict[int, dict[bytes, bytes]] = {}

    def get_many(self, partition: int, keys: list[bytes]) -> list[bytes | None]:
        return [self.data.get(partition, {}).get(k) for k in keys]

    def apply(self, writes: dict[int, list[tuple[bytes, bytes | None]]]) -> None:
        for p, ws in writes.items():
            d = self.data.setdefault(p, {})
            for k, v in ws:
                if v is None:
                    d.pop(k, None)
                else:
                    d[k] = v


def msg(topic: str, offset: int, value: object, p: int = 0, key: bytes | None = None) -> Message:
    """A message keyed by its user_id, as a site's producer would key it."""
    raw = value if isinstance(value, bytes) else orjson.dumps(value)
    if key is None:
        key = str(value["user_id"]).encode() if isinstance(value, dict) and "user_id" in value else b"u1"
    return Message(topic, p, offset, key, raw, T0)


def core() -> BatchCore:
    return BatchCore(seeds("clevertap-cart-inaction.yaml"), Topics(), Decoder(), clock=lambda: T0 / 1000)


def test_entry_writes_timer_before_state_and_replay_is_a_noop() -> None:
    c, store = core(), MemStore()
    batch = [msg("add_to_cart", 5, {"user_id": "u1", "ts": T0, "props": {"product": "Hoodie"}})]
    out = c.run(batch, store)
    keys = [k for k, _ in out.writes[0]]
    assert keys[0].startswith(b"t:") and keys[1] == user_key("u1")
    assert parse_timer_key(keys[0]) == (T0 + 30 * M, "u1")
    store.apply(out.writes)
    again = c.run(batch, store)  # the same offsets again, as after a crash before commit
    assert again.duplicates == 1 and again.writes == {} and again.records == []


def test_tick_sends_once_and_deletes_the_timer() -> None:
    c, store = core(), MemStore()
    store.apply(
        c.run([msg("add_to_cart", 0, {"user_id": "u1", "ts": T0, "props": {"product": "Hoodie"}})], store).writes
    )
    tick = msg("nudgeflow.ticks", 0, {"user_id": "u1", "due": T0 + 30 * M})
    out = c.run([tick], store)
    (send,) = [r for r in out.records if r.topic == "nudgeflow.send.push"]
    body = orjson.loads(send.value)
    assert body["content"]["title"] == "Still thinking about Hoodie?" and send.key == b"u1"
    assert dict(send.headers or [])["idempotency_key"] == body["key"].encode()
    assert [v for k, v in out.writes[0] if k.startswith(b"t:")] == [None]
    store.apply(out.writes)
    dup_tick = msg("nudgeflow.ticks", 1, {"user_id": "u1", "due": T0 + 30 * M})
    assert c.run([dup_tick], store).records == []  # a second tick finds nothing due


def test_malformed_message_goes_to_dead_letter_with_reason_and_original_bytes() -> None:
    c, store = core(), MemStore()
    out = c.run([msg("add_to_cart", 9, b'{"ts": 1}'), msg("add_to_cart", 10, {"user_id": "u1", "ts": T0})], store)
    (dead,) = [r for r in out.records if r.topic == "nudgeflow.dead_letter"]
    assert dead.value == b'{"ts": 1}'
    h = dict(dead.headers or [])
    assert h["reason"] == b"missing_user_id" and h["source_offset"] == b"9" and h["source_topic"] == b"add_to_cart"
    assert out.invalid == [("add_to_cart", "missing_user_id")]
    assert user_key("u1") in [k for k, _ in out.writes[0]]  # the good message after it was processed


def test_unwatched_events_cost_no_state_read_or_write() -> None:
    c = core()

    class NoReads(MemStore):
        def get_many(self, partition: int, keys: list[bytes]) -> list[bytes | None]:
            raise AssertionError("no read expected")

    out = c.run([msg("page_viewed", i, {"user_id": "u1", "ts": T0 + i}) for i in range(50)], NoReads())
    assert out.consumed == {"page_viewed": 50} and out.writes == {}


def test_event_time_gate_holds_timers_while_an_input_lags() -> None:
    from nudgeflow.agents.timers import event_time_gate

    inf = float("inf")
    assert event_time_gate([]) == inf
    assert event_time_gate([(False, 5), (False, None)]) == inf  # caught up
    assert event_time_gate([(True, 500), (False, 900)]) == 500  # the lagging one decides
    assert event_time_gate([(True, 500), (True, 300)]) == 300
    assert event_time_gate([(True, None)]) == float("-inf")  # lagging and nothing applied: hold all


def test_batch_reports_progress_per_topic_partition() -> None:
    c, store = core(), MemStore()
    out = c.run([msg("add_to_cart", 7, {"user_id": "u1", "ts": T0 + 5}), msg("add_to_cart", 8, b"bad")], store)
    assert out.max_ts == {("add_to_cart", 0): T0 + 5}


def test_ticks_are_classified_fired_or_stale_and_purchases_cancel_timers() -> None:
    c, store = core(), MemStore()
    store.apply(
        c.run([msg("add_to_cart", 0, {"user_id": "u1", "ts": T0, "props": {"product": "Hoodie"}})], store).writes
    )
    due = T0 + 30 * M
    out = c.run([msg("nudgeflow.ticks", 0, {"user_id": "u1", "due": due})], store)
    assert out.ticks == [(0, due, False)]
    store.apply(out.writes)
    assert c.run([msg("nudgeflow.ticks", 1, {"user_id": "u1", "due": due})], store).ticks == [(0, due, True)]
    c2, store2 = core(), MemStore()
    store2.apply(c2.run([msg("add_to_cart", 0, {"user_id": "u2", "ts": T0})], store2).writes)
    assert c2.run([msg("charged", 0, {"user_id": "u2", "ts": T0 + M})], store2).timers_cancelled == 1


def test_an_exception_for_one_user_quarantines_that_user_only_and_release_applies_what_was_parked(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from nudgeflow.engine import core as engine_core

    real = engine_core.process

    def faulty(state, inp, now, js):  # type: ignore[no-untyped-def]
        if inp.user_id == "boom":
            raise RuntimeError("injected")
        return real(state, inp, now, js)

    c, store = core(), MemStore()
    cart = {"ts": T0, "props": {"product": "Hoodie"}}
    monkeypatch.setattr(engine_core, "process", faulty)
    batch = [msg("add_to_cart", i, {**cart, "user_id": u}) for i, u in enumerate(("u1", "boom", "u2"))]
    out = c.run(batch, store)
    store.apply(out.writes)
    assert out.quarantined == [("boom", "RuntimeError")] and out.parked == 1
    timers = sorted(parse_timer_key(k)[1] for k, v in out.writes[0] if k.startswith(b"t:") and v)
    assert timers == ["u1", "u2"]  # everyone else went on
    rec = orjson.loads(store.data[0][user_key("boom")])
    assert rec["quarantine"]["error"] == "RuntimeError" and len(rec["quarantine"]["parked"]) == 1
    assert b"injected" not in store.data[0][user_key("boom")]  # the text may quote user data: not kept

    later = c.run([msg("charged", 7, {"ts": T0 + M, "user_id": "boom"})], store)  # parked, not applied
    store.apply(later.writes)
    assert later.parked == 1 and later.records == []
    assert c.run([msg("nudgeflow.ticks", 0, {"user_id": "boom", "due": T0 + 30 * M})], store).records == []

    monkeypatch.setattr(engine_core, "process", real)  # "after a fix"
    release = {"user_id": "boom", "event": "nudgeflow.release", "ts": T0 + 2 * M}
    out = c.run([msg("custom_events", 8, release)], store)
    store.apply(out.writes)
    assert out.released == 1
    rec = orjson.loads(store.data[0][user_key("boom")])
    assert "quarantine" not in rec
    # the parked cart entered and the parked purchase converted: no push is ever due
    assert rec["state"]["instances"] == {} and rec["state"]["entries"]["clevertap-cart-inaction"]["count"] == 1


def test_deeply_nested_input_is_dead_lettered_not_crashing_the_batch() -> None:
    deep = b'{"user_id": "u1", "ts": %d, "props": ' % T0 + b'{"a": ' * 300 + b"1" + b"}" * 301
    assert orjson.loads(deep)  # valid JSON, but no state holding it could be written
    c, store = core(), MemStore()
    out = c.run([msg("add_to_cart", 0, deep), msg("add_to_cart", 1, {"user_id": "u2", "ts": T0})], store)
    assert out.invalid == [("add_to_cart", "too_deep")]
    assert [r.headers[0] for r in out.records if r.topic == "nudgeflow.dead_letter"] == [("reason", b"too_deep")]
    assert user_key("u2") in [k for k, _ in out.writes[0]]


def test_a_key_that_is_not_the_user_id_is_dead_lettered_keyless_per_policy() -> None:
    cart = {"user_id": "mm-1", "ts": T0, "props": {"product": "Hoodie"}}
    out = core().run([msg("add_to_cart", 0, cart, key=b"session-1")], MemStore())
    assert out.invalid == [("add_to_cart", "key_mismatch")] and out.writes == {}
    keyless = Message("add_to_cart", 0, 1, None, orjson.dumps(cart), T0)
    assert core().run([keyless], MemStore()).writes  # accepted by default
    strict = BatchCore(
        seeds("clevertap-cart-inaction.yaml"), Topics(), Decoder(), lambda: T0 / 1000, keyless="dead_letter"
    )
    assert strict.run([keyless], MemStore()).invalid == [("add_to_cart", "missing_key")]


def test_records_stored_by_nudgeflow_0_1_are_read_in_the_new_shape() -> None:
    from nudgeflow.agents.batch import upgrade_record

    inst = {"v": 1, "n": 2, "step": "wait_30_minutes", "since": T0, "wake": T0 + 30 * M, "k": 0, "entered": T0}
    inst |= {"trigger": {"product": "Hoodie"}, "tid": "e1", "vars": {}, "converted": False}
    old = {
        "s": {
            "clock": T0,
            "inst": {"clevertap-cart-inaction": inst},
            "done": {"x": {"n": 1, "until": T0 + 1}},
            "entries": {"clevertap-cart-inaction": {"n": 2, "ts": [T0 - 1, T0]}},
            "profile": {"vip": True},
            "hist": {"c1": [T0]},
        },
        "o": {"add_to_cart": 4},
    }
    store = MemStore()
    store.apply({0: [(user_key("u1"), orjson.dumps(old))]})
    out = core().run([msg("nudgeflow.ticks", 0, {"user_id": "u1", "due": T0 + 30 * M})], store)
    (send,) = [orjson.loads(r.value) for r in out.records if r.topic == "nudgeflow.send.push"]
    assert send["instance"] == 2 and send["trigger_event_id"] == "e1" and send["content"]["title"].endswith("Hoodie?")
    new = upgrade_record(old)
    assert new["offsets"] == {"add_to_cart": 4} and new["state"]["entries"]["clevertap-cart-inaction"]["count"] == 2
