"""Issue 13's cases, written as a marketer or a support engineer meets them: a journey file, a
timeline of events, and the sends (or output) they expect."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import orjson
import pytest

from nudgeflow.engine.errors import JourneyFileErrors
from nudgeflow.engine.io import Event
from nudgeflow.engine.loader import load_texts
from nudgeflow.engine.simulate import Simulator
from tests.unit.journeys import T0, D, H, M

CART_PUSH = """\
journey: cart-push
name: Cart push
entry: {event: add_to_cart, while_active: restart}
goal: {event: charged, where: {cart_id: "{{ trigger.cart_id }}"}, within: 2h, exit: false}
steps:
  bought_it:
    wait_for: charged
    where: {cart_id: "{{ trigger.cart_id }}"}
    timeout: 30m
    on_timeout: push
    next: end
  push: {send: push, title: "Still want cart {{ trigger.cart_id }}?"}
"""


def sim(**docs: str) -> Simulator:
    return Simulator(load_texts({f"{k}.yaml": v for k, v in docs.items()}))


def test_a_wait_keyed_to_the_trigger_matches_only_that_cart() -> None:
    s = sim(cart=CART_PUSH)
    # u1 adds cart C and buys exactly C: no push; u2 adds C, buys another cart D: pushed about C
    s.feed(Event("u1", "add_to_cart", T0, {"cart_id": "C"}))
    s.feed(Event("u1", "charged", T0 + 5 * M, {"cart_id": "C"}))
    s.feed(Event("u2", "add_to_cart", T0, {"cart_id": "C"}))
    s.feed(Event("u2", "charged", T0 + 5 * M, {"cart_id": "D"}))
    s.run_until(T0 + 3 * H)
    assert [(r.user_id, r.content["title"]) for r in s.sends] == [("u2", "Still want cart C?")]
    assert [c.detail for c in s.counts("step")] == ["bought_it:performed", "bought_it:timed_out"]
    assert len(s.counts("converted")) == 1  # u1's purchase of C is the goal; u2's of D is not


def test_a_keyed_wait_sees_the_purchase_processed_before_the_add_to_cart() -> None:
    # topics arrive out of order: the charged event (later in time) is processed first
    s = sim(cart=CART_PUSH)
    s.feed(Event("u1", "charged", T0 + 5 * M, {"cart_id": "C"}))
    s.feed(Event("u1", "add_to_cart", T0, {"cart_id": "C"}))
    s.feed(Event("u2", "charged", T0 + 5 * M, {"cart_id": "X"}))
    s.feed(Event("u2", "add_to_cart", T0, {"cart_id": "C"}))
    s.run_until(T0 + 3 * H)
    assert [r.user_id for r in s.sends] == ["u2"]


def test_a_keyed_exit_and_a_keyed_goal_after_exit() -> None:
    doc = """\
journey: booking
name: Booking reminder
entry: {event: booking_started}
goal: {event: booking_paid, where: {booking: {eq: "{{ trigger.booking }}"}}, within: 1d}
exit_when: [{event: booking_cancelled, where: {booking: "{{ trigger.booking }}"}}]
steps:
  w: {wait: 1h}
  remind: {send: push, title: "Finish booking {{ trigger.booking }}"}
"""
    s = sim(booking=doc)
    s.feed(Event("u1", "booking_started", T0, {"booking": "B1"}))
    s.feed(Event("u1", "booking_cancelled", T0 + M, {"booking": "B9"}))  # another booking: stays
    s.feed(Event("u2", "booking_started", T0, {"booking": "B2"}))
    s.feed(Event("u2", "booking_cancelled", T0 + M, {"booking": "B2"}))  # this one: leaves
    s.run_until(T0 + 2 * H)
    assert [r.user_id for r in s.sends] == ["u1"]
    s.feed(Event("u1", "booking_paid", T0 + 3 * H, {"booking": "B7"}))  # not the booking reminded of
    s.feed(Event("u1", "booking_paid", T0 + 4 * H, {"booking": "B1"}))  # after the journey ended
    assert [(c.journey, c.detail) for c in s.counts("converted")] == [("booking", "after_exit")]


@pytest.mark.parametrize(
    "where",
    [
        '{cart_id: "{{ trigger.cart_id | upper }}"}',
        '{any: [{cart_id: "{{ trigger.cart_id }}"}]}',
        '{cart_id: {ne: "{{ trigger.cart_id }}"}}',
        '{cart_id: {in: ["{{ trigger.cart_id }}"]}}',
        '{cart_id: "cart-{{ trigger.cart_id }}"}',
    ],
)
def test_template_text_that_would_be_compared_literally_is_refused(where: str) -> None:
    doc = CART_PUSH.replace('where: {cart_id: "{{ trigger.cart_id }}"}\n    timeout', f"where: {where}\n    timeout")
    assert doc != CART_PUSH
    with pytest.raises(JourneyFileErrors) as e:
        load_texts({"cart.yaml": doc})
    assert "compared as literal text" in str(e.value) and "steps.bought_it.where" in str(e.value)


def test_an_entry_filter_with_template_text_is_refused() -> None:
    doc = CART_PUSH.replace("entry: {event: add_to_cart,", 'entry: {event: add_to_cart, where: {c: "{{ trigger.c }}"},')
    with pytest.raises(JourneyFileErrors, match="compared as literal text"):
        load_texts({"cart.yaml": doc})


SEGMENTS = """\
segments:
  lapsed: {not: {has_done: login, within: 30d}}
  one_time_buyer: {has_done: charged, within: 365d, at_least: 1, at_most: 1}
"""
WINBACK = """\
journey: winback
name: We miss you
entry: {segment_entered: lapsed}
steps:
  miss_you: {send: email, subject: "We miss you"}
"""
AGED_OUT = """\
journey: aged-out
name: Last purchase over a year ago
entry: {segment_left: one_time_buyer}
steps:
  come_back: {send: email, subject: "It has been a year"}
"""


def test_time_driven_segments_change_without_new_input() -> None:
    s = sim(segments=SEGMENTS, winback=WINBACK, aged=AGED_OUT)
    s.feed(Event("u1", "login", T0))
    s.feed(Event("u1", "login", T0 + 10 * D))  # the 30 days count from here
    s.feed(Event("u2", "charged", T0))
    s.feed(Event("u2", "login", T0 + 100 * D))
    s.run_until(T0 + 400 * D)  # nothing else happens: only time passes
    got = [(r.user_id, r.content["subject"], (r.created_at - T0) // D) for r in s.sends]
    assert got == [
        ("u1", "We miss you", 40),  # 30 days after the last login (u2 was never "not lapsed" before day 100)
        ("u2", "We miss you", 130),
        ("u2", "It has been a year", 365),
    ]


INSURANCE = """\
segments:
  one_time_buyer: {has_done: charged, within: 365d, at_least: 1, at_most: 1}
  insurance_browser: {has_done: page_viewed, where: {page_category: Insurance}, within: 180d}
  one_time_insurance_browser: {all: [{in_segment: one_time_buyer}, {in_segment: insurance_browser}]}
"""
RECOMMEND = """\
journey: recommend
name: Insurance recommendations for one-time buyers
entry:
  segment_entered: one_time_insurance_browser
  include_current_members: true
  starts_at: 2026-03-01T00:00:00Z
steps:
  recommend: {send: email, subject: "Insurance picked for you"}
"""


def test_current_members_enter_when_the_journey_starts() -> None:
    s = sim(segments=INSURANCE, recommend=RECOMMEND)
    s.feed(Event("u1", "charged", T0 - 200 * D))  # a member long before the start
    s.feed(Event("u1", "page_viewed", T0 + 10 * D, {"page_category": "Insurance"}))
    s.feed(Event("u2", "charged", T0))  # bought, but browsed nothing: not a member
    s.feed(Event("u3", "charged", T0 + 80 * D))  # becomes a member after the start: the usual way
    s.feed(Event("u3", "page_viewed", T0 + 81 * D, {"page_category": "Insurance"}))
    s.run_until(T0 + 100 * D)
    assert [(r.user_id, (r.created_at - T0) // D) for r in s.sends] == [("u1", 59), ("u3", 81)]
    assert len(s.counts("admitted")) == 1


def test_current_members_are_admitted_once_per_activation() -> None:
    from nudgeflow.engine.core import process
    from nudgeflow.engine.io import MemberCheck

    js = load_texts(
        {"segments.yaml": INSURANCE, "recommend.yaml": RECOMMEND.replace("  starts_at: 2026-03-01T00:00:00Z\n", "")}
    )
    st = process(None, Event("u1", "charged", T0), T0, js).state
    st = process(st, Event("u1", "page_viewed", T0, {"page_category": "Insurance"}), T0, js).state
    st["instances"].clear()  # the flip entered u1; say the journey was added after it
    st["entries"].clear()
    first = process(st, MemberCheck("u1", "recommend"), T0 + H, js)
    again = process(first.state, MemberCheck("u1", "recommend"), T0 + 2 * H, js)  # the scan repeated
    sends = [fx for fx in first.effects + again.effects if type(fx).__name__ == "SendRequest"]
    assert len(sends) == 1


def test_include_current_members_needs_a_segment_entry() -> None:
    doc = RECOMMEND.replace("segment_entered: one_time_insurance_browser", "event: charged")
    with pytest.raises(JourneyFileErrors, match="include_current_members needs entry: segment_entered"):
        load_texts({"segments.yaml": INSURANCE, "recommend.yaml": doc})


def test_simulate_streams_a_file_out_of_order_and_traces_one_user(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import random

    from nudgeflow.simulate import InputFiles, run

    js = load_texts({"cart.yaml": CART_PUSH})
    lines = []
    for i in range(300):
        u, t = f"u{i % 30}", T0 + i * M
        lines.append({"user_id": u, "event": "add_to_cart", "ts": t, "props": {"cart_id": f"c{i}"}})
        if i % 3 == 0:
            lines.append({"user_id": u, "event": "charged", "ts": t + 5 * M, "props": {"cart_id": f"c{i}"}})
    ordered = tmp_path / "ordered.jsonl"
    ordered.write_bytes(b"".join(orjson.dumps(x) + b"\n" for x in sorted(lines, key=lambda x: x["ts"])))
    random.Random(3).shuffle(lines)
    shuffled = tmp_path / "shuffled.jsonl"
    shuffled.write_bytes(b"".join(orjson.dumps(x) + b"\n" for x in lines) + b"{not json\n")
    run(js, InputFiles(ordered, None, sys.stderr), None, tmp_path / "a")
    capsys.readouterr()
    run(js, InputFiles(shuffled, None, sys.stderr), None, tmp_path / "b", trace_user="u7")
    err = capsys.readouterr().err
    assert (tmp_path / "a" / "sends.jsonl").read_bytes() == (tmp_path / "b" / "sends.jsonl").read_bytes()
    assert f"{shuffled}:401: " in err  # the bad line, by number, once
    trace = [x for x in err.splitlines() if x.startswith("trace u7")]
    assert any("cart-push: entered" in x for x in trace) and any("SEND push at step push" in x for x in trace)
    assert not any("trace u8" in x for x in err.splitlines())
    summary = [orjson.loads(x) for x in (tmp_path / "b" / "summary.jsonl").read_bytes().splitlines()]
    assert [r["step"] for r in summary if r["type"] == "step"] == ["bought_it", "push"]


def _simulated(tmp_path: Path) -> tuple[object, Path]:
    """The keyed cart journey over a few users, through `nudgeflow simulate --out`."""
    from nudgeflow.simulate import InputFiles, run

    js = load_texts({"cart.yaml": CART_PUSH})
    events = tmp_path / "events.jsonl"
    rows = [
        {"user_id": "u1", "event": "add_to_cart", "ts": T0, "props": {"cart_id": "C"}, "event_id": "e1"},
        {"user_id": "u1", "event": "charged", "ts": T0 + M, "props": {"cart_id": "C"}},
        {"user_id": "u2", "event": "add_to_cart", "ts": T0, "props": {"cart_id": "C"}, "event_id": "e2"},
        {"user_id": "u3", "event": "add_to_cart", "ts": T0, "props": {"cart_id": "D"}, "event_id": "e3"},
    ]
    events.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in rows))
    run(js, InputFiles(events, None, sys.stderr), T0 + H, tmp_path / "out")
    return js, tmp_path / "out" / "summary.jsonl"


def test_graph_draws_the_journey_with_counts_on_steps_and_arrows(tmp_path: Path) -> None:
    from nudgeflow.report import counts_from_summary, render

    js, summary = _simulated(tmp_path)
    j = js.journeys["cart-push"]  # type: ignore[attr-defined]
    counts = counts_from_summary(summary)["cart-push"]
    text = render(j, counts, "mermaid").decode()
    assert text.startswith("flowchart TD")
    assert 'entry(["Cart push<br/>on add_to_cart<br/>entered 3"])' in text
    assert 's0 -- "did charged 1" --> done' in text and 's0 -- "timed out 2" --> s1' in text
    assert 's1["push<br/>send push<br/>visits 2<br/>sent push 2"]' in text
    source = render(j, counts, "dot").decode()
    assert source.startswith('digraph "cart-push"') and '"bought_it" -> "push" [label="timed out 2"]' in source
    if shutil.which("dot") is None and not os.environ.get("REQUIRE_DEPLOY_TOOLS"):
        pytest.skip("Graphviz not installed (apt-get install graphviz)")
    svg = render(j, counts, "svg").decode()
    assert "<svg" in svg and "timed out 2" in svg


def test_stats_lists_journeys_and_steps_in_journey_order(tmp_path: Path) -> None:
    from nudgeflow.report import counts_from_metrics, counts_from_summary, stats_rows

    js, summary = _simulated(tmp_path)
    rows = stats_rows(js, counts_from_summary(summary))  # type: ignore[arg-type]
    assert rows[0] == {
        "type": "journey",
        "journey": "cart-push",
        "entered": 3,
        "active": 0,
        "converted": 1,
        "exited": {"completed": 3},
        "skipped": {},
        "sent": {"push": 2},
    }
    assert [(r["step"], r.get("visits"), r.get("timed_out")) for r in rows[1:]] == [
        ("bought_it", 3, 2),
        ("push", 2, None),
    ]
    metrics = """\
# TYPE nudgeflow_journey_entries_total counter
nudgeflow_journey_entries_total{journey="cart-push"} 5.0
# TYPE nudgeflow_journey_exits_total counter
nudgeflow_journey_exits_total{journey="cart-push",reason="completed"} 2.0
# TYPE nudgeflow_journey_step_visits_total counter
nudgeflow_journey_step_visits_total{journey="cart-push",step="push"} 2.0
nudgeflow_journey_step_visits_total{journey="cart-push",step="bought_it"} 5.0
# TYPE nudgeflow_send_requests_total counter
nudgeflow_send_requests_total{channel="push",journey="cart-push",step="push"} 2.0
# TYPE nudgeflow_delivery_feedback_total counter
nudgeflow_delivery_feedback_total{journey="cart-push",step="push",status="clicked"} 1.0
"""
    live = stats_rows(js, counts_from_metrics(metrics))  # type: ignore[arg-type]
    assert live[0]["active"] == 3 and live[0]["sent"] == {"push": 2}
    assert live[2] == {
        "type": "step",
        "journey": "cart-push",
        "step": "push",
        "kind": "send push",
        "visits": 2,
        "sent_push": 2,
        "clicked": 1,
    }


def test_inspect_says_where_a_user_is_and_why_they_got_a_message() -> None:
    from nudgeflow.report import inspect_lines

    s = sim(cart=CART_PUSH)
    s.feed(Event("u2", "add_to_cart", T0, {"cart_id": "C"}, "e2"))
    waiting = inspect_lines(s.journeys, "u2", {"state": s.states["u2"], "offsets": {}}, T0 + M)
    text = "\n".join(waiting)
    assert "cart-push v1 entry #1 at 2026-01-01T00:00:00Z (1m ago) (trigger event e2, trigger {cart_id})" in text
    assert (
        "at step bought_it (wait for charged (30m)) since 2026-01-01T00:00:00Z (1m ago); "
        "wakes 2026-01-01T00:30:00Z (in 29m)" in text
    )
    s.run_until(T0 + H)
    sent = "\n".join(inspect_lines(s.journeys, "u2", {"state": s.states["u2"], "offsets": {}}, T0 + H, values=True))
    (req,) = s.sends
    assert f"2026-01-01T00:30:00Z (30m ago)  cart-push/push push key {req.key} (trigger event e2)" in sent
    assert "in no journey now" in sent and "cart-push: 1 time(s)" in sent


def test_one_instance_per_cart_each_with_its_own_timer() -> None:
    doc = CART_PUSH.replace(
        "entry: {event: add_to_cart, while_active: restart}", "entry: {event: add_to_cart, instance_per: cart_id}"
    )
    s = sim(cart=doc)
    s.feed(Event("u1", "add_to_cart", T0, {"cart_id": "A"}))
    s.feed(Event("u1", "add_to_cart", T0 + 10 * M, {"cart_id": "B"}))
    s.feed(Event("u1", "add_to_cart", T0 + 12 * M, {"cart_id": "A"}))  # A again while A runs: ignored
    s.feed(Event("u1", "charged", T0 + 20 * M, {"cart_id": "A"}))  # bought A: only A's instance ends
    s.feed(Event("u1", "add_to_cart", T0 + 21 * M))  # no cart id: no instance to run
    s.run_until(T0 + 3 * H)
    assert [(r.content["title"], (r.created_at - T0) // M) for r in s.sends] == [("Still want cart B?", 40)]
    assert sorted(c.detail for c in s.counts("skipped")) == ["already_in_journey", "no_instance_key"]
    assert [c.detail for c in s.counts("step")] == ["bought_it:performed", "bought_it:timed_out"]
    assert s.states["u1"]["instances"] == {}


def test_instance_per_needs_an_event_entry() -> None:
    doc = RECOMMEND.replace("  include_current_members: true\n", "  instance_per: cart_id\n")
    with pytest.raises(JourneyFileErrors, match="instance_per needs entry: event"):
        load_texts({"segments.yaml": INSURANCE, "recommend.yaml": doc})


def test_simulate_live_calls_reach_a_real_api(tmp_path: Path) -> None:
    """`simulate --calls live` makes the calls as the call runner would (policy included)."""
    from nudgeflow.channels.outbound import OutboundPolicy
    from nudgeflow.simulate import InputFiles, live_answers, run
    from tests.apis import ApiHandler, start

    seen: list[str] = []

    class Recs(ApiHandler):
        def do_GET(self) -> None:
            seen.append(self.path)
            self.answer(200, {"items": [{"name": "Term Life"}]})

    base, stop = start(Recs)
    doc = f"""\
journey: recs
name: recommendations
entry: {{event: go}}
steps:
  fetch: {{call: "{base}/recs?user={{{{ user.id }}}}", save_as: recs, timeout: 5s}}
  mail: {{send: email, subject: "{{{{ vars.recs.items[0].name }}}}"}}
"""
    events = tmp_path / "e.jsonl"
    events.write_bytes(orjson.dumps({"user_id": "u1", "event": "go", "ts": T0}) + b"\n")
    try:
        answer, close = live_answers(OutboundPolicy([], ["127.0.0.0/8"]), 32768)
        run(load_texts({"recs.yaml": doc}), InputFiles(events, None, sys.stderr), None, tmp_path / "out", answer)
        close()
        refused, close2 = live_answers(OutboundPolicy([], []), 32768)  # loopback not allowed: on_error
        sim_refused = run(
            load_texts({"recs.yaml": doc}), InputFiles(events, None, sys.stderr), None, tmp_path / "o2", refused
        )
        close2()
    finally:
        stop()
    (send,) = [orjson.loads(x) for x in (tmp_path / "out" / "sends.jsonl").read_bytes().splitlines()]
    assert send["content"]["subject"] == "Term Life" and seen == ["/recs?user=u1"]
    assert (tmp_path / "o2" / "sends.jsonl").read_bytes() == b"" and not sim_refused.unanswered


def test_stats_shows_experiment_arms_with_uplift_from_a_workers_metrics() -> None:
    from nudgeflow.report import counts_from_metrics, format_stats, stats_rows

    js = load_texts(
        {
            "ab.yaml": """\
journey: ab
name: ab
entry: {event: go}
goal: {event: buy, within: 7d}
steps:
  ab:
    split:
      - {percent: 50, next: a}
      - {percent: 50, control: true}
  a: {send: push, title: A}
"""
        }
    )
    metrics = "# TYPE nudgeflow_experiment_users_total counter\n" + "".join(
        f'nudgeflow_experiment_users_total{{journey="ab",split="ab",arm="{arm}",outcome="{o}"}} {n}\n'
        for arm, o, n in (
            ("a", "entered", 1000),
            ("a", "converted", 300),
            ("control", "entered", 1000),
            ("control", "converted", 200),
        )
    )
    text = format_stats(stats_rows(js, counts_from_metrics(metrics)))
    assert "split ab arm a: entered 1000, converted 300 (30.0%), +10.0 points vs control (95% CI +6.2 to +13.8)" in text
    assert "split ab arm control: entered 1000, converted 200 (20.0%)" in text
