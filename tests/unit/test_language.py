"""Language features not covered by the seed journeys: splits, windows, fixed dates, versions,
pause/stop, enrolment, caps, unset, and the per-step visit counts."""

from __future__ import annotations

import datetime as dt

from nudgeflow.engine.core import process
from nudgeflow.engine.io import Enroll, Event, ProfileUpdate, Tick
from nudgeflow.engine.loader import load_texts
from nudgeflow.engine.simulate import Simulator
from tests.unit.journeys import T0, D, H, M

BASE = """\
journey: j
name: j
{extra}
entry:
  {entry}
steps:
{steps}
"""


def js(steps: str, entry: str = "event: go", extra: str = "") -> object:
    return load_texts({"j.yaml": BASE.format(steps=steps, entry=entry, extra=extra)})


def test_split_is_deterministic_per_user_and_control_receives_nothing() -> None:
    j = js("""  ab:
    split:
      - {percent: 40, next: a}
      - {percent: 40, next: b}
      - {percent: 20, control: true}
  a: {send: push, title: A, next: end}
  b: {send: push, title: B, next: end}""")
    s = Simulator(j)  # type: ignore[arg-type]
    for i in range(1000):
        s.feed(Event(f"u{i}", "go", T0))
    titles = [r.content["title"] for r in s.sends]
    control = len(s.counts("step"))
    assert 350 < titles.count("A") < 450 and 350 < titles.count("B") < 450 and 150 < control < 250
    again = Simulator(j)  # type: ignore[arg-type]
    for i in range(1000):
        again.feed(Event(f"u{i}", "go", T0))
    assert [r.key for r in again.sends] == [r.key for r in s.sends]


def test_wait_window_quiet_hours_in_the_users_time_zone() -> None:
    j = js("""  business_hours:
    wait_window: {days: [mon, tue, wed, thu, fri], from: "09:00", to: "21:00", timezone: "attribute:tz"}
  hello: {send: sms, text: hi}""")
    s = Simulator(j)  # type: ignore[arg-type]
    s.feed(ProfileUpdate("ist", T0 - D, {"tz": "Asia/Kolkata"}))
    # 2026-01-03 is a Saturday; 22:00 UTC Friday 2 Jan = 03:30 Saturday in India
    fri_22_utc = int(dt.datetime(2026, 1, 2, 22, tzinfo=dt.UTC).timestamp() * 1000)
    s.feed(Event("ist", "go", fri_22_utc))
    s.feed(Event("utc", "go", fri_22_utc))
    s.run_until(fri_22_utc + 5 * D)
    at = {r.user_id: dt.datetime.fromtimestamp(r.created_at / 1000, dt.UTC) for r in s.sends}
    assert at["ist"] == dt.datetime(2026, 1, 5, 3, 30, tzinfo=dt.UTC)  # Monday 09:00 in India
    assert at["utc"] == dt.datetime(2026, 1, 5, 9, 0, tzinfo=dt.UTC)  # Monday 09:00 UTC


def test_wait_until_a_fixed_date_and_an_attribute_that_is_missing() -> None:
    j = js("""  sale_day: {wait_until: 2026-01-10T08:00:00Z}
  promo: {send: push, title: Sale}""")
    s = Simulator(j)  # type: ignore[arg-type]
    s.feed(Event("u", "go", T0))
    s.feed(Event("late", "go", T0 + 20 * D))  # after the date: sent at once
    s.run_until(T0 + 30 * D)
    assert [(r.user_id, r.created_at - T0) for r in s.sends] == [("u", 9 * D + 8 * H), ("late", 20 * D)]
    j2 = js("""  before_due: {wait_until: {attribute: due, offset: -1d}, if_missing: end}
  remind: {send: sms, text: due}""")
    s2 = Simulator(j2)  # type: ignore[arg-type]
    s2.feed(Event("nodate", "go", T0))
    assert s2.sends == [] and [c.detail for c in s2.counts("exited")] == ["attribute_missing"]


def test_new_version_continues_at_the_same_step_and_drains_removed_steps() -> None:
    v1 = js("""  w1: {wait: 1h}
  s1: {send: push, title: old}
  w2: {wait: 1d}
  s2: {send: push, title: old2}""")
    r = process(None, Event("u", "go", T0), T0, v1)  # type: ignore[arg-type]
    r2 = process(None, Event("v", "go", T0), T0, v1)  # type: ignore[arg-type]
    r2 = process(r2.state, Tick("v"), T0 + H, v1)  # type: ignore[arg-type]  # v is now on w2
    v2 = js(
        """  w1: {wait: 1h}
  s1: {send: push, title: new}
  s2: {send: push, title: new2}""",
        extra="version: 2",
    )
    out = process(r.state, Tick("u"), T0 + H, v2)  # type: ignore[arg-type]
    sends = [e for e in out.effects if type(e).__name__ == "SendRequest"]
    assert [s.content["title"] for s in sends] == ["new", "new2"] and sends[0].journey_version == 2  # type: ignore[attr-defined]
    gone = process(r2.state, Tick("v"), T0 + H + D, v2)  # type: ignore[arg-type]
    assert [e.detail for e in gone.effects if type(e).__name__ == "Count"] == ["step_removed"]  # type: ignore[attr-defined]


def test_paused_holds_users_and_stopped_releases_them_without_messages() -> None:
    steps = """  w: {wait: 1h}
  s: {send: push, title: hi}"""
    active = js(steps)
    r = process(None, Event("u", "go", T0), T0, active)  # type: ignore[arg-type]
    paused = js(steps, extra="status: paused")
    p = process(r.state, Tick("u"), T0 + H, paused)  # type: ignore[arg-type]
    assert not [e for e in p.effects if type(e).__name__ == "SendRequest"]
    assert p.state["instances"]["j"]["wake"] == T0 + 2 * H  # re-checked an hour later
    assert [
        e.detail
        for e in process(None, Event("n", "go", T0), T0, paused).effects  # type: ignore[arg-type]
        if type(e).__name__ == "Count"
    ] == ["paused"]  # type: ignore[attr-defined]
    resumed = process(p.state, Tick("u"), T0 + 2 * H, active)  # type: ignore[arg-type]
    assert [e.created_at for e in resumed.effects if type(e).__name__ == "SendRequest"] == [T0 + 2 * H]  # type: ignore[attr-defined]
    stopped = process(r.state, Tick("u"), T0 + H, js(steps, extra="status: stopped"))  # type: ignore[arg-type]
    assert [e.detail for e in stopped.effects if type(e).__name__ == "Count"] == ["journey_stopped"]  # type: ignore[attr-defined]


def test_enrolled_entry_cap_without_period_and_unset() -> None:
    j = js(
        """  tag: {update: {set: {vip: true}, unset: [trial]}}
  hello: {send: email, subject: "Welcome {{ trigger.source }}"}""",
        entry="enrolled: true\n  cap: {max: 2}",
    )
    s = Simulator(j)  # type: ignore[arg-type]
    s.feed(ProfileUpdate("u", T0 - 1, {"trial": True}))
    for k in range(3):
        s.feed(Enroll("u", "j", T0 + k * D, {"source": "csv"}))
    s.feed(Event("u", "go", T0 + 4 * D))  # not an entry trigger of this journey
    assert [r.content["subject"] for r in s.sends] == ["Welcome csv", "Welcome csv"]
    assert [c.detail for c in s.counts("skipped")] == ["capped"]
    assert s.states["u"]["profile"] == {"vip": True}


def test_visit_counts_give_the_per_step_funnel() -> None:
    j = js("""  w: {wait: 10m}
  s: {send: push, title: hi}""")
    s = Simulator(j)  # type: ignore[arg-type]
    s.feed(Event("a", "go", T0))
    s.feed(Event("b", "go", T0))
    s.run_until(T0 + 5 * M)
    assert [c.detail for c in s.counts("visit")] == ["w", "w"]
    s.run_until(T0 + 20 * M)
    assert [c.detail for c in s.counts("visit")] == ["w", "w", "s", "s"]


def test_experiment_results_per_arm_with_uplift_against_control() -> None:
    from nudgeflow.simulate import experiment_results

    j = js(
        """  ab:
    split:
      - {percent: 50, next: a}
      - {percent: 50, control: true}
  a: {send: push, title: A}""",
        extra="goal: {event: buy, within: 7d}",
    )
    s = Simulator(j)  # type: ignore[arg-type]
    users = [f"u{i}" for i in range(2000)]
    for u in users:
        s.feed(Event(u, "go", T0))
    # everyone in arm a buys when their index is even, the control arm never: a clear uplift
    in_a = {r.user_id for r in s.sends}
    for i, u in enumerate(users):
        if u in in_a and i % 2 == 0:
            s.feed(Event(u, "buy", T0 + 60_000))
    rows = {r["arm"]: r for r in experiment_results(s)}
    a, control = rows["a"], rows["control"]
    assert a["entered"] + control["entered"] == 2000 and control["converted"] == 0
    assert a["converted"] == len([u for i, u in enumerate(users) if u in in_a and i % 2 == 0])
    assert a["ci95_pp"][0] < a["uplift_pp"] < a["ci95_pp"][1] and a["ci95_pp"][0] > 40  # about +50 points
