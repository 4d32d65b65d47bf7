"""Properties of the engine over random event streams (hypothesis).

For every user and journey: no send outside an entry..exit span (so none after an exit or a
conversion), no two sends share an idempotency key, entries respect once/lock/cap, every
instance of a journey without loops ends, and the same input always gives the same output.
"""

from __future__ import annotations

import itertools
from collections import defaultdict

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nudgeflow.engine.io import Count, Event, SendRequest
from nudgeflow.engine.loader import load_journeys, load_texts
from nudgeflow.engine.simulate import Simulator
from tests.unit.journeys import T0, D, M, seeds

CAPPED = """\
journey: capped
name: capped test journey
entry:
  event: e
  where: {ok: {ne: false}}
  lock: 1d
  cap: {max: 2, per: 10d}
goal: {event: g, within: 3d}
exit_when: [{event: x}]
steps:
  first_wait: {wait: 2h}
  first_send: {send: push, title: "one {{ trigger.n }}"}
  wait_reply:
    wait_for: f
    timeout: 1d
    on_timeout: second_send
  thanks: {send: sms, text: thanks, next: end}
  second_send: {send: email, subject: two}
  coin:
    split:
      - {percent: 50, next: third_send}
      - {percent: 50, control: true}
  third_send: {send: sms, text: three}
"""
ONCE = CAPPED.replace("journey: capped", "journey: once").replace(
    "  lock: 1d\n  cap: {max: 2, per: 10d}\n", "  eligibility: once\n"
)
JOURNEYS = load_texts({"capped.yaml": CAPPED, "once.yaml": ONCE})
SEEDS = seeds("clevertap-cart-inaction.yaml", "betaout-cart-recovery.yaml", "netmera-discounts-favorites.yaml")
NAMES = ["e", "f", "g", "x", "add_to_cart", "charged", "screen_view", "add_to_favorites", "purchase"]

events = st.lists(
    st.tuples(
        st.sampled_from(["u0", "u1", "u2"]),
        st.sampled_from(NAMES),
        st.integers(min_value=0, max_value=3 * 24 * 60),  # minutes after the previous event
        st.booleans(),
        st.integers(min_value=0, max_value=300),
    ),
    max_size=40,
)


def props(name: str, flag: bool, n: int) -> dict[str, object]:
    return {"ok": flag, "n": n, "product": f"p{n}", "screen_name": "Discounts" if flag else "Home", "price": n}


def run(js: object, script: list[tuple[str, str, int, bool, int]]) -> dict[str, list[tuple[int, object]]]:
    """One simulator per user (users are independent): their effect logs."""
    sims: dict[str, Simulator] = defaultdict(lambda: Simulator(js))  # type: ignore[arg-type]
    t = T0 + 400 * D  # after the Netmera schedule start
    for user, name, gap, flag, n in script:
        t += gap * M
        sims[user].feed(Event(user, name, t, props(name, flag, n)))
    for s in sims.values():
        s.run_until(t + 60 * D)
    return {u: list(s.log) for u, s in sims.items()}


def check_spans(logs: dict[str, list[tuple[int, object]]]) -> None:
    keys: set[str] = set()
    for user, log in logs.items():
        active: set[str] = set()
        for _, fx in log:
            if isinstance(fx, Count) and fx.kind == "entered":
                assert fx.journey not in active
                active.add(fx.journey)
            elif isinstance(fx, Count) and fx.kind == "exited":
                assert fx.journey in active, (user, fx)
                active.discard(fx.journey)
            elif isinstance(fx, SendRequest):
                assert fx.journey in active, f"{user}: send outside an entry..exit span: {fx}"
                assert fx.key not in keys, f"duplicate idempotency key {fx.key}"
                keys.add(fx.key)
        assert not active, f"{user}: instances never ended: {active}"


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(events)
def test_test_journeys_spans_keys_caps_and_endings(script: list[tuple[str, str, int, bool, int]]) -> None:
    logs = run(JOURNEYS, script)
    check_spans(logs)
    for _user, log in logs.items():
        entries: dict[str, list[int]] = defaultdict(list)
        for t, fx in log:
            if isinstance(fx, Count) and fx.kind == "entered":
                entries[fx.journey].append(t)
        assert len(entries["once"]) <= 1
        capped = entries["capped"]
        assert all(b - a >= D for a, b in itertools.pairwise(capped)), "lock violated"
        for i, t in enumerate(capped):
            assert sum(1 for x in capped[: i + 1] if x > t - 10 * D) <= 2, "cap violated"


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(events)
def test_seed_journeys_spans_and_keys(script: list[tuple[str, str, int, bool, int]]) -> None:
    check_spans(run(SEEDS, script))


@settings(max_examples=50, deadline=None)
@given(events)
def test_deterministic(script: list[tuple[str, str, int, bool, int]]) -> None:
    assert run(JOURNEYS, script) == run(JOURNEYS, script)


def test_all_shipped_journeys_load_for_the_property_runs() -> None:
    from tests.unit.journeys import ROOT

    assert len(load_journeys([ROOT / "journeys"]).journeys) == 16  # 4 seed journeys + 10 workflows (4 is 3 files)
