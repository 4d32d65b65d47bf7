"""The batch core (Kafka- and Faust-free): state writes, timer index, DLQ records, replay dedupe,
the record cache, and quarantine through the safe re-run."""

from __future__ import annotations

import orjson
import pytest

from nudgeflow.agents.batch import BatchCore, BatchOutput, Raw
from nudgeflow.agents.keys import parse_timer_key, user_key
from nudgeflow.engine import core as engine_core
from nudgeflow.streams.events import Decoder
from nudgeflow.streams.topics import Topics
from tests.unit.journeys import T0, M, seeds


class MemStore:
    def __init__(self) -> None:
        self.data: dict[int, dict[bytes, bytes]] = {}
        self.reads = 0

    def get_many(self, partition: int, keys: list[bytes]) -> list[bytes | None]:
        self.reads += len(keys)
        return [self.data.get(partition, {}).get(k) for k in keys]

    def apply(self, out: BatchOutput, core: BatchCore | None = None) -> None:
        for writes in (out.writes, out.local):
            for p, ws in writes.items():
                d = self.data.setdefault(p, {})
                for k, v in ws:
                    if v is None:
                        d.pop(k, None)
                    else:
                        d[k] = v
        if core is not None:
            core.written(out)

    def timers(self, p: int = 0) -> list[tuple[int, str]]:
        return sorted(parse_timer_key(k) for k in self.data.get(p, {}) if k.startswith(b"t:"))


def msg(topic: str, offset: int, value: object, p: int = 0, key: bytes | None = None) -> Raw:
    """A message keyed by its user_id, as a site's producer would key it."""
    raw = value if isinstance(value, bytes) else orjson.dumps(value)
    if key is None:
        key = str(value["user_id"]).encode() if isinstance(value, dict) and "user_id" in value else b"u1"
    return Raw(topic, p, offset, key, raw, T0)


def cart(user: str, offset: int, ts: int = T0, product: str = "Hoodie") -> Raw:
    return msg("add_to_cart", offset, {"user_id": user, "ts": ts, "props": {"product": product}})


def core(**kw: object) -> BatchCore:
    return BatchCore(seeds("clevertap-cart-inaction.yaml"), Topics(), Decoder(), clock=lambda: T0 / 1000, **kw)  # type: ignore[arg-type]


def test_entry_writes_the_record_and_its_timer_and_a_replay_after_a_crash_is_a_noop() -> None:
    c, store = core(), MemStore()
    batch = [cart("u1", 5)]
    out = c.run(batch, store)
    # to RocksDB and the changelog: the record, and who is at which step now (agents.occupancy)
    assert out.writes[0][0][0] == user_key("u1")
    assert out.writes[0][1] == (b"c:users", b'{"clevertap-cart-inaction\\u001fwait_30_minutes":1}')
    assert out.local[0] == [(b"t:" + (T0 + 30 * M).to_bytes(8, "big") + b"u1", b"1")]  # RocksDB only
    store.apply(out, c)
    again = core().run(batch, store)  # a new process reads the same offsets again
    assert again.duplicates == 1 and again.writes == {} and again.records == [] and again.local == {}


def test_tick_sends_once_and_deletes_the_timer() -> None:
    c, store = core(), MemStore()
    store.apply(c.run([cart("u1", 0)], store), c)
    tick = msg("nudgeflow.ticks", 0, {"user_id": "u1", "due": T0 + 30 * M})
    out = c.run([tick], store)
    (send,) = [r for r in out.records if r.topic == "nudgeflow.send.push"]
    body = orjson.loads(send.value)
    assert body["content"]["title"] == "Still thinking about Hoodie?" and send.key == b"u1"
    assert dict(send.headers or [])["idempotency_key"] == body["key"].encode()
    assert [v for _, v in out.local[0]] == [None]
    store.apply(out, c)
    assert store.timers() == []
    dup_tick = msg("nudgeflow.ticks", 1, {"user_id": "u1", "due": T0 + 30 * M})
    assert c.run([dup_tick], store).records == []  # a second tick finds nothing due


def test_send_requests_are_the_wire_format() -> None:
    from nudgeflow.engine.io import SendRequest
    from nudgeflow.streams.wire import encode_send_request, send_request_doc

    c, store = core(), MemStore()
    store.apply(c.run([cart("u1", 0)], store), c)
    out = c.run([msg("nudgeflow.ticks", 0, {"user_id": "u1", "due": T0 + 30 * M})], store)
    (send,) = [r for r in out.records if r.topic == "nudgeflow.send.push"]
    doc = orjson.loads(send.value)
    assert doc.pop("schema_version") == 1 and doc["to"] is None
    assert doc["expires_at"] == doc["created_at"] + 12 * 3_600_000  # push: 12 h by default
    fallback = {**doc, "fallback": None}
    req = SendRequest(**{**doc, "fallback": SendRequest(**fallback)})
    assert orjson.loads(encode_send_request(req).value) == send_request_doc(req)


def test_malformed_message_goes_to_dead_letter_with_reason_and_original_bytes() -> None:
    c, store = core(), MemStore()
    out = c.run([msg("add_to_cart", 9, b'{"ts": 1}'), msg("add_to_cart", 10, {"user_id": "u1", "ts": T0})], store)
    (dead,) = [r for r in out.records if r.topic == "nudgeflow.dead_letter"]
    assert dead.value == b'{"ts": 1}'
    h = dict(dead.headers or [])
    assert h["reason"] == b"missing_user_id" and h["source_offset"] == b"9" and h["source_topic"] == b"add_to_cart"
    assert out.invalid == [("add_to_cart", "missing_user_id")]
    assert user_key("u1") in [k for k, _ in out.writes[0]]  # the good message after it was processed


def test_an_event_without_ts_takes_the_kafka_timestamp_and_without_either_is_dead_lettered() -> None:
    c = core()
    no_ts = {"user_id": "u1", "props": {"product": "Hoodie"}}
    stamped = msg("add_to_cart", 0, no_ts)  # Kafka timestamp T0
    unstamped = Raw("add_to_cart", 0, 1, b"u1", orjson.dumps(no_ts), None)
    out = BatchOutput()
    items = c.decode([stamped, unstamped], out)
    assert [(i.offset, i.at, i.input.ts) for i in items] == [(0, T0, T0)]
    assert out.invalid == [("add_to_cart", "bad_timestamp")]
    # an explicit ts wins over the Kafka timestamp
    (item,) = c.decode([msg("add_to_cart", 2, {**no_ts, "ts": T0 - 5})], BatchOutput())
    assert item.at == T0 - 5


def test_unwatched_events_cost_no_state_read_or_write() -> None:
    class NoReads(MemStore):
        def get_many(self, partition: int, keys: list[bytes]) -> list[bytes | None]:
            raise AssertionError("no read expected")

    out = core().run([msg("page_viewed", i, {"user_id": "u1", "ts": T0 + i}) for i in range(50)], NoReads())
    assert out.consumed == {"page_viewed": 50} and out.writes == {}


def test_ticks_are_classified_fired_or_stale_and_purchases_cancel_timers() -> None:
    c, store = core(), MemStore()
    store.apply(c.run([cart("u1", 0)], store), c)
    due = T0 + 30 * M
    out = c.run([msg("nudgeflow.ticks", 0, {"user_id": "u1", "due": due})], store)
    assert out.ticks == [(0, due, False)]
    store.apply(out, c)
    assert c.run([msg("nudgeflow.ticks", 1, {"user_id": "u1", "due": due})], store).ticks == [(0, due, True)]
    c2, store2 = core(), MemStore()
    store2.apply(c2.run([cart("u2", 0)], store2), c2)
    assert c2.run([msg("charged", 0, {"user_id": "u2", "ts": T0 + M})], store2).timers_cancelled == 1


def test_the_timer_index_changes_once_per_user_and_batch_and_counts_are_tallied() -> None:
    c, store = core(), MemStore()
    store.apply(c.run([cart("u1", 0), cart("u2", 1)], store), c)
    assert store.timers() == [(T0 + 30 * M, "u1"), (T0 + 30 * M, "u2")]
    # u1 restarts three times (each restart clears the wait it set), u2 buys, u3 enters and buys
    batch = [cart("u1", 2 + i, T0 + (i + 1) * M) for i in range(3)]
    batch += [msg("charged", 0, {"user_id": "u2", "ts": T0 + M})]
    batch += [cart("u3", 5, T0 + M), msg("charged", 1, {"user_id": "u3", "ts": T0 + 2 * M})]
    out = c.run(batch, store)
    ops = sorted((parse_timer_key(k), v) for k, v in out.local[0])
    assert ops == [((T0 + 30 * M, "u1"), None), ((T0 + 30 * M, "u2"), None), ((T0 + 33 * M, "u1"), b"1")]
    assert out.timers_set == {0: 1} and out.timers_cleared == {0: 2} and out.earliest_timer == {0: T0 + 33 * M}
    assert out.timers_cancelled == 5  # 3 restarts' and 2 purchases' cleared waits
    journey = "clevertap-cart-inaction"
    assert out.counts[("entered", journey, "")] == 4 and out.counts[("exited", journey, "restarted")] == 3
    assert out.counts[("converted", journey, "")] == 2 and out.counts[("exited", journey, "converted")] == 2
    store.apply(out, c)
    assert store.timers() == [(T0 + 33 * M, "u1")]


def test_records_stay_cached_between_batches_within_the_bound() -> None:
    c, store = core(cache_users=2), MemStore()
    store.apply(c.run([cart(u, i) for i, u in enumerate(("u1", "u2", "u3"))], store), c)
    assert set(c.cache) == {(0, "u2"), (0, "u3")}  # the least recently written went
    assert c.unwritten == {}
    store.reads = 0
    store.apply(c.run([cart("u3", 9, T0 + M)], store), c)
    assert store.reads == 0  # cached: no read
    out = c.run([cart("u1", 10, T0 + M)], store)
    assert store.reads == 1 and orjson.loads(out.writes[0][0][1])["state"]["entries"]
    assert set(c.unwritten) == {(0, "u1")}  # computed, not written yet: what a read sees
    c.forget()
    assert c.cache == {} and c.unwritten == {}


def test_batches_folded_into_one_checkpoint_are_read_from_it_and_written_as_one() -> None:
    c, store = core(), MemStore()
    unit: dict[tuple[int, str], bytes] = {}
    first = c.run([cart("u1", 0)], store)
    c.fold(unit, first)
    second = c.run([cart("u1", 1, T0 + M, "Cap"), cart("u2", 2)], store)  # u1 read from the unit
    c.fold(unit, second)
    assert c.pending == [unit] and first.serialized == {} == second.serialized
    assert store.reads == 2  # u1 in the first batch, u2 in the second
    u1 = orjson.loads(unit[(0, "u1")])
    assert u1["state"]["entries"]["clevertap-cart-inaction"]["count"] == 2
    c.written_records(unit)
    assert c.unwritten == {} and set(c.cache) == {(0, "u1"), (0, "u2")}


def test_an_exception_for_one_user_quarantines_that_user_only_and_release_applies_what_was_parked(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    real = engine_core.apply

    def faulty(state, inp, now, js, sink, wall=None):  # type: ignore[no-untyped-def]
        if inp.user_id == "boom":
            raise RuntimeError("injected")
        real(state, inp, now, js, sink, wall)

    c, store = core(), MemStore()
    monkeypatch.setattr(engine_core, "apply", faulty)
    batch = [cart(u, i) for i, u in enumerate(("u1", "boom", "u2"))]
    out = c.run(batch, store)
    store.apply(out, c)
    assert out.quarantined == [("boom", "RuntimeError")] and out.parked == 1
    assert [u for _, u in store.timers()] == ["u1", "u2"]  # everyone else went on
    assert out.counts[("entered", "clevertap-cart-inaction", "")] == 2  # counted once, not in both runs
    assert len([r for r in out.records if r.topic.startswith("nudgeflow.send")]) == 0
    u1 = orjson.loads(store.data[0][user_key("u1")])
    assert u1["state"]["entries"]["clevertap-cart-inaction"]["count"] == 1  # applied once
    rec = orjson.loads(store.data[0][user_key("boom")])
    assert rec["quarantine"]["error"] == "RuntimeError" and len(rec["quarantine"]["parked"]) == 1
    assert b"injected" not in store.data[0][user_key("boom")]  # the text may quote user data: not kept

    later = c.run([msg("charged", 7, {"ts": T0 + M, "user_id": "boom"})], store)  # parked, not applied
    store.apply(later, c)
    assert later.parked == 1 and later.records == []
    assert c.run([msg("nudgeflow.ticks", 0, {"user_id": "boom", "due": T0 + 30 * M})], store).records == []

    monkeypatch.setattr(engine_core, "apply", real)  # "after a fix"
    release = {"user_id": "boom", "event": "nudgeflow.release", "ts": T0 + 2 * M}
    out = c.run([msg("custom_events", 8, release)], store)
    store.apply(out, c)
    assert out.released == 1
    rec = orjson.loads(store.data[0][user_key("boom")])
    assert "quarantine" not in rec
    # the parked cart entered and the parked purchase converted: no push is ever due
    assert rec["state"]["instances"] == {} and rec["state"]["entries"]["clevertap-cart-inaction"]["count"] == 1


def test_the_safe_re_run_reads_a_batch_that_is_computed_but_not_yet_written(monkeypatch: pytest.MonkeyPatch) -> None:
    c, store = core(), MemStore()
    first = c.run([cart("u1", 0)], store)  # computed, in flight: not in the store yet
    real = engine_core.apply

    def faulty(state, inp, now, js, sink, wall=None):  # type: ignore[no-untyped-def]
        if inp.user_id == "boom":
            raise RuntimeError("injected")
        real(state, inp, now, js, sink, wall)

    monkeypatch.setattr(engine_core, "apply", faulty)
    out = c.run([cart("u1", 1, T0 + M, "Cap"), cart("boom", 2)], store)
    store.apply(first, c)
    store.apply(out, c)
    u1 = orjson.loads(store.data[0][user_key("u1")])
    assert u1["state"]["entries"]["clevertap-cart-inaction"]["count"] == 2  # both carts, each once
    assert u1["state"]["instances"]["clevertap-cart-inaction"]["trigger"]["product"] == "Cap"


def test_deeply_nested_input_is_dead_lettered_not_crashing_the_batch() -> None:
    deep = b'{"user_id": "u1", "ts": %d, "props": ' % T0 + b'{"a": ' * 300 + b"1" + b"}" * 301
    assert orjson.loads(deep)  # valid JSON, but no state holding it could be written
    c, store = core(), MemStore()
    out = c.run([msg("add_to_cart", 0, deep), msg("add_to_cart", 1, {"user_id": "u2", "ts": T0})], store)
    assert out.invalid == [("add_to_cart", "too_deep")]
    assert [r.headers[0] for r in out.records if r.topic == "nudgeflow.dead_letter"] == [("reason", b"too_deep")]
    assert user_key("u2") in [k for k, _ in out.writes[0]]


def test_a_key_that_is_not_the_user_id_is_dead_lettered_keyless_per_policy() -> None:
    cart_doc = {"user_id": "mm-1", "ts": T0, "props": {"product": "Hoodie"}}
    out = core().run([msg("add_to_cart", 0, cart_doc, key=b"session-1")], MemStore())
    assert out.invalid == [("add_to_cart", "key_mismatch")] and out.writes == {}
    keyless = Raw("add_to_cart", 0, 1, None, orjson.dumps(cart_doc), T0)
    assert core().run([keyless], MemStore()).writes  # accepted by default
    strict = core(keyless="dead_letter")
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
    store.data[0] = {user_key("u1"): orjson.dumps(old)}
    out = core().run([msg("nudgeflow.ticks", 0, {"user_id": "u1", "due": T0 + 30 * M})], store)
    (send,) = [orjson.loads(r.value) for r in out.records if r.topic == "nudgeflow.send.push"]
    assert send["instance"] == 2 and send["trigger_event_id"] == "e1" and send["content"]["title"].endswith("Hoodie?")
    new = upgrade_record(old)
    assert new["offsets"] == {"add_to_cart": 4} and new["state"]["entries"]["clevertap-cart-inaction"]["count"] == 2
