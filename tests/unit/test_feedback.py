"""Delivery feedback in the engine: counted per journey step; bounces and opt-outs change which
channel a later message uses (fallbacks skip it)."""

from __future__ import annotations

import orjson

from nudgeflow.engine.core import process
from nudgeflow.engine.io import Count, Event, Feedback, SendRequest
from nudgeflow.engine.state import new_state
from nudgeflow.streams import wire
from tests.unit.journeys import T0, texts

JS = texts(
    j="""journey: j
name: J
entry: {event: go}
steps:
  hello:
    send: email
    subject: "Hello"
    text: "Hi"
    fallback: {send: sms, text: "Hi"}
"""
)


def run(st, inp, t):  # type: ignore[no-untyped-def]
    r = process(st, inp, t, JS)
    return r.state, r.effects


def test_unsubscribed_and_bounced_channels_are_skipped_for_the_fallback() -> None:
    st, fx = run(new_state(), Event("u", "go", T0, {}), T0)
    assert [s.channel for s in fx if isinstance(s, SendRequest)] == ["email"]
    st, fx = run(st, Feedback("u", "email", "unsubscribed"), T0 + 1)
    st, fx = run(st, Event("u", "go", T0 + 2, {}), T0 + 2)
    assert [s.channel for s in fx if isinstance(s, SendRequest)] == ["sms"]
    st, fx = run(st, Feedback("u", "sms", "bounced"), T0 + 3)
    st, fx = run(st, Event("u", "go", T0 + 4, {}), T0 + 4)
    assert [s for s in fx if isinstance(s, SendRequest)] == []  # neither channel: nothing sent
    assert any(isinstance(c, Count) and c.kind == "unreachable" for c in fx)
    st, fx = run(st, Feedback("u", "email", "subscribed"), T0 + 5)
    st, fx = run(st, Event("u", "go", T0 + 6, {}), T0 + 6)
    assert [s.channel for s in fx if isinstance(s, SendRequest)] == ["email"]


def test_feedback_about_a_message_is_counted_per_step_and_round_trips_the_wire() -> None:
    st, _ = run(new_state(), Event("u", "go", T0, {}), T0)
    fb = Feedback("u", "email", "opened", "key-1", "j", "hello")
    assert wire.decode_feedback("u", orjson.loads(wire.encode_feedback(fb).value)) == fb
    _, fx = run(st, fb, T0 + 1)
    assert [(c.kind, c.journey, c.detail) for c in fx if isinstance(c, Count)] == [("feedback", "j", "hello:opened")]


CART = texts(
    cart="""journey: cart
name: Cart
entry: {event: add_to_cart, while_active: restart}
exit_when: [{event: charged}]
steps:
  wait: {wait: 5s}
  push: {send: push, title: "Come back"}
"""
)


def test_feedback_does_not_move_journey_time_so_a_wait_is_not_fired_before_the_events_that_end_it() -> None:
    """Feedback comes in processing time (a sender's Kafka timestamp), events in event time. A worker
    catching up reads a sender's feedback from minutes later next to a purchase made before a
    cart's wait ended: the feedback must not fire the wait ahead of the purchase (chaos check,
    2026-12-07: a push to someone who bought)."""
    r = process(new_state(), Event("u", "add_to_cart", T0, {}), T0, CART)
    r = process(r.state, Feedback("u", "push", "delivered", "k", "cart", "push"), T0 + 60_000, CART)
    assert not [fx for fx in r.effects if isinstance(fx, SendRequest)]
    assert r.state["clock"] == T0  # journey time stays where the events left it
    r = process(r.state, Event("u", "charged", T0 + 4_000, {}), T0 + 4_000, CART)
    assert not r.state["instances"] and not [fx for fx in r.effects if isinstance(fx, SendRequest)]
    # without the purchase the wait ends at its time, whatever feedback came in between
    r = process(new_state(), Event("u", "add_to_cart", T0, {}), T0, CART)
    r = process(r.state, Feedback("u", "push", "opened"), T0 + 60_000, CART)
    r = process(r.state, Event("u", "page_view", T0 + 6_000, {}), T0 + 6_000, CART)
    assert [fx.created_at for fx in r.effects if isinstance(fx, SendRequest)] == [T0 + 5_000]
