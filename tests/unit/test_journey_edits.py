"""What an edited journey does to users already in it (README "Editing journeys").

Each test runs users into a journey, swaps in the edited definition (as a worker restarted with
the new file would) and checks what happens next, on the virtual clock.
"""

from __future__ import annotations

from nudgeflow.agents.registry import edits
from nudgeflow.engine.graph import JourneySet
from nudgeflow.engine.io import Event
from nudgeflow.engine.loader import load_texts
from nudgeflow.engine.simulate import Simulator
from tests.unit.journeys import T0, D, H, M, S

HEAD = "journey: j\nname: j\nversion: {v}\nentry: {{event: go}}\nsteps:\n"


def journey(steps: str, v: int = 1, extra: str = "") -> JourneySet:
    return load_texts({"j.yaml": HEAD.format(v=v) + steps + extra})


def sent(s: Simulator) -> list[tuple[str, str, int]]:
    return [(r.user_id, r.content["title"], r.created_at - T0) for r in s.sends]


def test_an_edit_that_removes_a_step_without_a_version_bump_drains_it_instead_of_crashing() -> None:
    kept = "  wait_a: {wait: 20s}\n  push_a: {send: push, title: a}\n"
    v1 = journey(kept + "  wait_b: {wait: 40s}\n  sms_b: {send: sms, text: b}\n")
    s = Simulator(v1)
    for i in range(5):
        s.feed(Event(f"u{i}", "go", T0))
    s.run_until(T0 + 30 * S)  # everyone got push_a and waits in wait_b
    s.journeys = journey(kept)  # same version 1
    s.feed(Event("new", "go", T0 + 31 * S))
    s.run_until(T0 + D)
    exits = sorted((c.detail, c.journey) for c in s.counts("exited"))
    assert exits == [("completed", "j")] + [("step_removed", "j")] * 5
    assert [t for _, t, _ in sent(s)] == ["a"] * 6  # no sms_b for anyone


def test_users_in_a_wait_keep_the_deadline_they_have_new_entries_get_the_new_duration() -> None:
    v1 = journey("  w: {wait: 60s}\n  p: {send: push, title: p}\n")
    s = Simulator(v1)
    s.feed(Event("early", "go", T0))
    s.journeys = journey("  w: {wait: 10s}\n  p: {send: push, title: p}\n", v=2)
    s.feed(Event("late", "go", T0 + S))
    s.run_until(T0 + H)
    assert sorted(sent(s)) == [("early", "p", 60 * S), ("late", "p", 11 * S)]


def test_a_changed_branch_decides_for_users_who_reach_it_after_the_edit() -> None:
    steps = "  w: {{wait: 1h}}\n  b: {{if: {{has_done: go, within: 30d, at_least: {n}}}, then: high, else: low}}\n"
    steps += "  high: {{send: push, title: high, next: end}}\n  low: {{send: push, title: low, next: end}}\n"
    s = Simulator(journey(steps.format(n=5)))
    s.feed(Event("waiting", "go", T0))
    s.feed(Event("past", "go", T0 - 2 * H))
    s.run_until(T0 - 30 * M)  # "past" went through the branch before the edit: no
    s.journeys = journey(steps.format(n=1), v=2)
    s.run_until(T0 + D)
    assert sorted(sent(s)) == [("past", "low", -H), ("waiting", "high", H)]


def test_changed_split_shares_apply_to_new_entries_and_never_move_users_already_split() -> None:
    steps = (
        "  w: {{wait: 1h}}\n  ab:\n    split:\n      - {{percent: {a}, next: a}}\n      - {{percent: {b}, next: b}}\n"
    )
    steps += "  a: {{send: push, title: a, next: end}}\n  b: {{send: push, title: b, next: end}}\n"
    s = Simulator(journey(steps.format(a=50, b=50)))
    for i in range(200):
        s.feed(Event(f"u{i}", "go", T0))
    s.run_until(T0 + 2 * H)
    before = {u: t for u, t, _ in sent(s)}
    s.journeys = journey(steps.format(a=100, b=0), v=2)
    for i in range(200, 300):
        s.feed(Event(f"u{i}", "go", T0 + 3 * H))
    s.run_until(T0 + D)
    after = {u: t for u, t, _ in sent(s)}
    assert {u: after[u] for u in before} == before and 60 < list(before.values()).count("a") < 140
    assert {after[f"u{i}"] for i in range(200, 300)} == {"a"}


def test_the_content_digest_sees_edits_but_not_key_order_comments_or_status() -> None:
    steps = "  w: {wait: 1h}\n  p: {send: push, title: hi}\n"
    base = journey(steps).journeys["j"].digest
    reordered = load_texts(
        {"j.yaml": "name: j\njourney: j\nversion: 1\n# a comment\nentry: {event: go}\nsteps:\n" + steps}
    )
    assert reordered.journeys["j"].digest == base
    assert journey(steps, extra="status: paused\n").journeys["j"].digest == base
    edited = journey(steps.replace("1h", "2h"))
    assert edited.journeys["j"].digest != base
    found = edits(edited, {"j@1": base})
    assert [(e.journey, e.version, e.was, e.now) for e in found] == [("j", 1, base, edited.journeys["j"].digest)]
    assert edits(journey(steps.replace("1h", "2h"), v=2), {"j@1": base}) == []  # bumped: fine
