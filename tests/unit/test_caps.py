"""Frequency caps across journeys, per user: marketing sends over a cap are skipped (counted) or
delayed until the cap allows them; transactional journeys are exempt."""

from __future__ import annotations

from typing import Any

from nudgeflow.engine.core import process
from nudgeflow.engine.io import Count, Event, SendRequest, Tick
from nudgeflow.engine.state import UserState, new_state, next_wake
from tests.unit.journeys import T0, D, H, M, texts


def journey(jid: str, event: str, channel: str, extra: str = "") -> str:
    return f"""journey: {jid}
name: {jid}
{extra}
entry: {{event: {event}}}
steps:
  say: {{send: {channel}, text: "hi from {jid}"}}
"""


JS = texts(
    caps="""frequency_caps:
  - {max: 2, per: 1d}
  - {max: 1, per: 1h, channel: push}
""",
    promo=journey("promo", "go", "push"),
    news=journey("news", "go2", "email"),
    otp=journey("otp", "otp", "push", "category: transactional"),
    later=journey("later", "go4", "push", "when_capped: delay"),
)


def feed(st: UserState, inp: Any, t: int) -> tuple[UserState, list[str], list[str]]:
    r = process(st, inp, t, JS)
    sent = [f"{s.journey}:{s.channel}" for s in r.effects if isinstance(s, SendRequest)]
    capped = [c.journey for c in r.effects if isinstance(c, Count) and c.kind == "capped"]
    return r.state, sent, capped


def test_caps_skip_marketing_sends_and_spare_transactional_ones() -> None:
    st = new_state()
    st, sent, _ = feed(st, Event("u", "go", T0), T0)
    assert sent == ["promo:push"]
    st, sent, _ = feed(st, Event("u", "otp", T0 + 10 * M), T0 + 10 * M)
    assert sent == ["otp:push"]  # transactional: not capped, not counted against the caps
    st, sent, capped = feed(st, Event("u", "go", T0 + 20 * M), T0 + 20 * M)
    assert sent == [] and capped == ["promo"]  # one push per hour
    st, sent, _ = feed(st, Event("u", "go2", T0 + 30 * M), T0 + 30 * M)
    assert sent == ["news:email"]  # the second marketing message today
    st, sent, capped = feed(st, Event("u", "go", T0 + 2 * H), T0 + 2 * H)
    assert sent == [] and capped == ["promo"]  # the hour is over, the day's two are used
    st, sent, _ = feed(st, Event("u", "go", T0 + D + 31 * M), T0 + D + 31 * M)
    assert sent == ["promo:push"]  # a day after: both earlier sends left the window


def test_a_delayed_send_goes_out_when_the_cap_allows_it_with_its_key() -> None:
    st = new_state()
    st, _, _ = feed(st, Event("u", "go", T0), T0)
    st, _, _ = feed(st, Event("u", "go2", T0 + M), T0 + M)
    st, sent, capped = feed(st, Event("u", "go4", T0 + 2 * H), T0 + 2 * H)
    assert sent == [] and capped == [] and next_wake(st) == T0 + D  # the first send leaves the day window
    st, sent, _ = feed(st, Tick("u"), T0 + D)
    assert sent == ["later:push"]
    assert len(st.get("sent", [])) == 2  # only what the longest cap window needs is kept
