"""Every journey of the seed documents, simulated over a scripted timeline: exact sends, times, exits."""

from __future__ import annotations

from pathlib import Path

from nudgeflow.engine.io import CallRequest, CallResult, Event, ProfileUpdate
from nudgeflow.engine.simulate import Simulator
from tests.unit.journeys import T0, D, H, M, seeds


def timeline(s: Simulator) -> list[tuple[int, str, str]]:
    """(offset from T0, channel, step) of every send."""
    return [(r.created_at - T0, r.channel, r.step) for r in s.sends]


def exits(s: Simulator) -> list[str]:
    return [c.detail for c in s.counts("exited")]


# --- Betaout (seeds/001) -------------------------------------------------------------------


def betaout() -> Simulator:
    return Simulator(seeds("betaout-cart-recovery.yaml"))


def test_betaout_sms_day1_email_day3_email_day7_sms_day10() -> None:
    s = betaout()
    s.feed(Event("rob", "add_to_cart", T0, {"product": "Earphones", "checkout_url": "https://shop/c/1"}))
    s.run_until(T0 + 30 * D)
    assert timeline(s) == [
        (1 * D, "sms", "sms_day_1"),
        (3 * D, "email", "email_day_3"),
        (7 * D, "email", "email_day_7"),
        (10 * D, "sms", "sms_day_10"),
    ]
    assert s.sends[0].content["text"].startswith("Your Earphones is waiting")
    assert "https://shop/c/1" in s.sends[0].content["text"]
    assert s.sends[1].content["subject"] == "You've left items in your cart. Shop now"
    assert s.sends[2].content["subject"] == "Your cart is getting out of stock! Shop now"
    assert exits(s) == ["completed"]


def test_betaout_purchase_on_day_4_stops_the_flow_and_converts() -> None:
    s = betaout()
    s.feed(Event("rob", "add_to_cart", T0, {"product": "Earphones"}))
    s.feed(Event("rob", "charged", T0 + 4 * D))
    s.run_until(T0 + 30 * D)
    assert timeline(s) == [(1 * D, "sms", "sms_day_1"), (3 * D, "email", "email_day_3")]
    assert exits(s) == ["converted"] and len(s.counts("converted")) == 1


def test_betaout_another_add_to_cart_does_not_restart_the_sequence() -> None:
    s = betaout()
    s.feed(Event("rob", "add_to_cart", T0, {"product": "Earphones"}))
    s.feed(Event("rob", "add_to_cart", T0 + 2 * D, {"product": "Case"}))
    s.run_until(T0 + 30 * D)
    assert [t for t, _, _ in timeline(s)] == [1 * D, 3 * D, 7 * D, 10 * D]
    assert [c.detail for c in s.counts("skipped")] == ["already_in_journey"]


# --- Netmera (seeds/003) -------------------------------------------------------------------

START = 1_734_434_100_000  # 2024-12-17T11:15:00Z, the journey's schedule start


def netmera() -> Simulator:
    return Simulator(seeds("netmera-discounts-favorites.yaml"))


def test_netmera_performed_then_purchase_over_100_converts_and_thanks() -> None:
    s = netmera()
    t = START + H
    s.feed(Event("ayla", "screen_view", t, {"screen_name": "Summer discounts"}))
    s.feed(Event("ayla", "add_to_favorites", t + 2 * H, {"product": "Lamp"}))
    s.feed(Event("ayla", "purchase", t + 5 * H, {"price": 150}))
    s.run_until(t + 30 * D)
    assert [(r.created_at - t, r.channel, r.step) for r in s.sends] == [
        (5 * H, "sms", "thank_you_sms"),
        (5 * H, "inapp", "feedback_widget"),
    ]
    assert len(s.counts("converted")) == 1 and exits(s) == ["completed"]


def test_netmera_cheap_purchase_is_performed_but_not_a_conversion() -> None:
    s = netmera()
    t = START + H
    s.feed(Event("ayla", "screen_view", t, {"screen_name": "Discounts"}))
    s.feed(Event("ayla", "add_to_favorites", t + H))
    s.feed(Event("ayla", "purchase", t + 2 * H, {"price": 40}))
    s.run_until(t + 30 * D)
    assert [r.step for r in s.sends] == ["thank_you_sms", "feedback_widget"]
    assert s.counts("converted") == []


def test_netmera_timed_out_paths() -> None:
    s = netmera()
    t = START + H
    s.feed(Event("no-fav", "screen_view", t, {"screen_name": "Discounts"}))
    s.feed(Event("fav-no-buy", "screen_view", t, {"screen_name": "Discounts"}))
    s.feed(Event("fav-no-buy", "add_to_favorites", t + 3 * H))
    s.run_until(t + 30 * D)
    got = {(r.user_id, r.created_at - t, r.channel, r.step) for r in s.sends}
    assert got == {
        ("no-fav", 1 * D, "push", "nudge_favorites"),
        ("fav-no-buy", 3 * H + 2 * D, "push", "push_offer"),
        ("fav-no-buy", 3 * H + 3 * D, "sms", "last_sms"),
    }
    outcomes = sorted(c.detail for c in s.counts("step") if c.detail.endswith("timed_out"))
    assert outcomes == ["check_favorites:timed_out", "check_purchase:timed_out"]


def test_netmera_entry_filter_schedule_and_lock() -> None:
    s = netmera()
    s.feed(Event("u", "screen_view", START - M, {"screen_name": "Discounts"}))  # before the schedule
    s.feed(Event("u", "screen_view", START + H, {"screen_name": "Home"}))  # filter does not match
    s.feed(Event("u", "screen_view", START + 2 * H, {"screen_name": "discounts"}))  # contains: any case
    s.run_until(START + 3 * D)
    s.feed(Event("u", "screen_view", START + 15 * D, {"screen_name": "Discounts"}))  # locked for 1 month
    s.feed(Event("u", "screen_view", START + 2 * H + 30 * D, {"screen_name": "Discounts"}))  # lock over
    assert len(s.counts("entered")) == 2
    assert [c.detail for c in s.counts("skipped")] == ["outside_schedule", "locked"]


# --- WebEngage RFM (seeds/002) -------------------------------------------------------------


def rfm() -> Simulator:
    return Simulator(seeds("segments.yaml", "webengage-rfm-one-time-buyers.yaml"))


RECS = {"items": [{"name": "Term Life Plus", "url": "https://bank.example/p/1"}]}


def calls(s: Simulator) -> list[CallRequest]:
    return [fx for _, fx in s.log if isinstance(fx, CallRequest)]


def test_rfm_one_time_buyer_who_browsed_insurance_gets_recommendation_email() -> None:
    s = rfm()
    s.feed(ProfileUpdate("priya", T0 - 40 * D, {"first_name": "Priya"}))
    s.feed(Event("priya", "page_viewed", T0 - 30 * D, {"page_category": "Insurance"}))
    s.feed(Event("priya", "charged", T0, {"amount": 1200}))  # first purchase in a year: enters the segment
    (call,) = calls(s)
    assert call.url == "https://recs.example.com/v1/recommendations?user=priya&category=Insurance"
    s.feed(CallResult("priya", call.key, True, RECS), at=T0 + 2000)
    (email,) = s.sends
    assert email.channel == "email" and email.content["subject"] == "Priya, a plan picked for you: Term Life Plus"
    assert email.fallback is not None and email.fallback.channel == "sms"
    assert "Term Life Plus" in email.fallback.content["text"]
    assert exits(s) == ["completed"]


def test_rfm_sms_when_email_unreachable_and_branch_by_category() -> None:
    s = rfm()
    s.feed(ProfileUpdate("arun", T0 - 2 * D, {"reachable_email": False}))
    s.feed(Event("arun", "page_viewed", T0 - D, {"page_category": "Loans"}))
    s.feed(Event("arun", "charged", T0))
    (call,) = calls(s)
    assert call.url.endswith("category=Loans")
    s.feed(CallResult("arun", call.key, True, RECS), at=T0 + 1000)
    (sms,) = s.sends
    assert sms.channel == "sms"
    assert sms.content["text"] == "Hi, we picked Term Life Plus for you. Details: https://bank.example/p/1"


def test_rfm_no_financial_browsing_ends_and_second_purchase_is_not_an_entry() -> None:
    s = rfm()
    s.feed(Event("bo", "page_viewed", T0 - D, {"page_category": "Sports"}))
    s.feed(Event("bo", "charged", T0))
    assert exits(s) == ["completed"] and s.sends == []
    s.feed(Event("bo", "charged", T0 + D))  # two purchases: leaves the segment, no new entry
    assert len(s.counts("entered")) == 1


def test_rfm_recommendation_call_timeout_ends_without_a_message() -> None:
    s = rfm()
    s.feed(Event("li", "page_viewed", T0 - D, {"page_category": "Loans"}))
    s.feed(Event("li", "charged", T0))
    s.run_until(T0 + H)
    assert s.sends == [] and exits(s) == ["completed"]
    assert [c.detail for c in s.counts("step")] == ["recommend_loans:timed_out"]


def test_simulate_lists_steps_in_journey_order() -> None:
    from nudgeflow.engine.io import Event
    from nudgeflow.simulate import simulate, summary

    js = seeds("betaout-cart-recovery.yaml")
    sim = simulate(js, [Event("u", "add_to_cart", T0, {"product": "p"})], until=T0 + 30 * D)
    steps = [r["step"] for r in summary(sim) if r["type"] == "step"]
    assert steps == sorted(steps, key=list(next(iter(js.journeys.values())).steps).index)
    assert steps.index("day_3") < steps.index("day_10")


def test_simulate_answers_call_steps_from_a_file_and_reports_those_it_could_not_run(tmp_path: Path) -> None:
    from nudgeflow.engine.io import Event, ProfileUpdate
    from nudgeflow.simulate import canned_answers, simulate

    js = seeds("segments.yaml", "webengage-rfm-one-time-buyers.yaml")
    inputs = [
        ProfileUpdate("priya", T0 - 40 * D, {"first_name": "Priya", "email": "p@example.com"}),
        Event("priya", "page_viewed", T0 - 30 * D, {"page_category": "Insurance"}),
        Event("priya", "charged", T0, {"amount": 1200}),
    ]
    calls = tmp_path / "calls.jsonl"
    calls.write_text('{"url": "category=Insurance", "body": {"items": [{"name": "Term Life", "url": "u"}]}}\n')
    sim = simulate(js, inputs, T0 + D, canned_answers(calls))
    (send,) = sim.sends
    assert send.channel == "email" and "Term Life" in send.content["subject"] and not sim.unanswered
    without = simulate(js, inputs, T0 + D)
    assert without.sends == [] and dict(without.unanswered) == {
        ("webengage-rfm-one-time-buyers", "recommend_insurance"): 1
    }


def test_a_call_made_while_catching_up_times_out_in_processing_time() -> None:
    """A worker applying hours-old events makes the call now: the answer comes in processing time,
    so the timeout counts from there and the answer is used (not timed out at once)."""
    from nudgeflow.engine.core import EffectList, apply
    from nudgeflow.engine.io import SendRequest
    from nudgeflow.engine.state import new_state

    js = seeds("segments.yaml", "webengage-rfm-one-time-buyers.yaml")
    st, wall = new_state(), T0 + 3 * H  # the events are three hours old
    sink = EffectList()
    for inp in (
        ProfileUpdate("priya", T0 - 40 * D, {"first_name": "Priya"}),
        Event("priya", "page_viewed", T0 - 30 * D, {"page_category": "Insurance"}),
        Event("priya", "charged", T0, {"amount": 1200}),
    ):
        apply(st, inp, inp.ts, js, sink, wall)
    (call,) = [f for f in sink.effects if isinstance(f, CallRequest)]
    (inst,) = st["instances"].values()
    assert inst["wake"] == wall + 30_000  # not T0 + 30 s: that would be due at once
    apply(st, CallResult("priya", call.key, True, {"items": [{"name": "Term Life", "url": "u"}]}), wall + 500, js, sink)
    assert [s.channel for s in sink.effects if isinstance(s, SendRequest)] == ["email"]
