"""The CleverTap in-action journey (seeds/000) with a virtual clock."""

from nudgeflow.engine.core import process
from nudgeflow.engine.io import Event, Tick
from nudgeflow.engine.simulate import Simulator
from tests.unit.journeys import T0, M, seeds

J = "clevertap-cart-inaction"


def sim() -> Simulator:
    return Simulator(seeds("clevertap-cart-inaction.yaml"))


def test_timed_out_cart_gets_one_push_naming_the_product_at_30_minutes() -> None:
    s = sim()
    s.feed(Event("u1", "add_to_cart", T0, {"product": "ABC Red hoodie"}, "e1"))
    s.run_until(T0 + 30 * M - 1)
    assert s.sends == []
    s.run_until(T0 + 2 * 60 * M)
    (push,) = s.sends
    assert push.channel == "push" and push.user_id == "u1" and push.created_at == T0 + 30 * M
    assert push.content["title"] == "Still thinking about ABC Red hoodie?"
    assert push.trigger_event_id == "e1" and push.step == "push_offer"
    assert [c.detail for c in s.counts("exited")] == ["completed"]
    assert s.pending() == 0


def test_charged_within_30_minutes_converts_and_sends_nothing() -> None:
    s = sim()
    s.feed(Event("u1", "add_to_cart", T0, {"product": "Hoodie"}))
    s.feed(Event("u1", "charged", T0 + 29 * M, {"amount": 40}))
    s.run_until(T0 + 24 * 60 * M)
    assert s.sends == []
    assert len(s.counts("converted", J)) == 1
    assert [c.detail for c in s.counts("exited")] == ["converted"]


def test_repeated_add_to_cart_restarts_the_wait_for_the_newest_product() -> None:
    s = sim()
    s.feed(Event("u1", "add_to_cart", T0, {"product": "Hoodie"}))
    s.feed(Event("u1", "add_to_cart", T0 + 20 * M, {"product": "Sneakers"}))
    s.run_until(T0 + 5 * 60 * M)
    (push,) = s.sends
    assert push.created_at == T0 + 50 * M and "Sneakers" in push.content["title"]
    assert [c.detail for c in s.counts("exited")] == ["restarted", "completed"]
    assert push.instance == 2


def test_purchase_after_the_push_still_counts_as_conversion_within_a_day() -> None:
    s = sim()
    s.feed(Event("u1", "add_to_cart", T0, {"product": "Hoodie"}))
    s.feed(Event("u1", "charged", T0 + 3 * 60 * M))
    assert len(s.sends) == 1
    assert [c.detail for c in s.counts("converted")] == ["after_exit"]


def test_event_after_deadline_sees_the_deadline_passed_first() -> None:
    # no timer fired (no scanner): the late charged event itself first runs the due push
    js = seeds("clevertap-cart-inaction.yaml")
    r1 = process(None, Event("u1", "add_to_cart", T0, {"product": "Hoodie"}), T0, js)
    r2 = process(r1.state, Event("u1", "charged", T0 + 31 * M), T0 + 31 * M, js)
    assert [type(e).__name__ for e in r2.effects].count("SendRequest") == 1


def test_charged_processed_before_its_earlier_add_to_cart_still_exits() -> None:
    # arrival order differs from event time across topics: charged (T0+5m) before add (T0)
    s = sim()
    s.feed(Event("u1", "charged", T0 + 5 * M), at=T0 + 5 * M)
    s.feed(Event("u1", "add_to_cart", T0, {"product": "Hoodie"}), at=T0)
    s.run_until(T0 + 2 * 60 * M)
    assert s.sends == []
    assert len(s.counts("converted")) == 1


def test_input_state_is_never_modified_and_ticks_are_idempotent() -> None:
    js = seeds("clevertap-cart-inaction.yaml")
    r1 = process(None, Event("u1", "add_to_cart", T0, {"product": "Hoodie"}), T0, js)
    snapshot = repr(r1.state)
    r2 = process(r1.state, Tick("u1"), T0 + 30 * M, js)
    assert repr(r1.state) == snapshot
    again = process(r1.state, Tick("u1"), T0 + 30 * M, js)
    assert [e for e in again.effects] == [e for e in r2.effects]  # deterministic: same key, same content
    stale = process(r2.state, Tick("u1"), T0 + 30 * M, js)
    assert stale.effects == []


def test_purchase_processed_before_its_add_to_cart_but_after_the_deadline_still_gets_the_push() -> None:
    # event time: add at T0, push due at T0+30m, purchase at T0+40m; arrival: purchase first
    s = sim()
    s.feed(Event("u1", "charged", T0 + 40 * M), at=T0 + 40 * M)
    s.feed(Event("u1", "add_to_cart", T0, {"product": "Hoodie"}), at=T0)
    (push,) = s.sends
    assert push.created_at == T0 + 30 * M
    assert [c.detail for c in s.counts("converted")] == ["after_exit"]
