"""The last sends a user's state keeps for `nudgeflow inspect`: one text of lines, the key of each
derived (not stored), the newest ten; records of earlier builds (a list per send) still read."""

from __future__ import annotations

from nudgeflow.engine.core import RECENT_SENDS, process
from nudgeflow.engine.io import Event, SendRequest
from nudgeflow.engine.state import UserState, new_state, push_recent, recent_send, recent_sends
from tests.unit.journeys import T0, texts

JS = texts(
    j="""journey: j
name: J
entry: {event: go}
steps:
  hello: {send: push, title: "Hi"}
"""
)


def test_each_send_is_read_back_with_its_own_key_and_trigger() -> None:
    st: UserState = new_state()
    keys = []
    for i in range(RECENT_SENDS + 3):
        r = process(st, Event("u 1", "go", T0 + i, {}, f"ev {i}"), T0 + i, JS)
        st = r.state
        keys += [fx.key for fx in r.effects if isinstance(fx, SendRequest)]
    assert isinstance(st.get("recent"), str)
    got = recent_sends(st, "u 1")
    assert [s[4] for s in got] == keys[-RECENT_SENDS:]  # the newest ten, the send requests' keys
    assert got[-1] == (T0 + RECENT_SENDS + 2, "j", "hello", "push", keys[-1], f"ev {RECENT_SENDS + 2}")


def test_a_line_break_in_an_event_id_does_not_split_an_entry() -> None:
    st = new_state()
    push_recent(st, recent_send(T0, "j", "s", "push", 1, 0, "a\nb"), 3)
    push_recent(st, recent_send(T0 + 1, "j", "s", "push", 2, 0, None), 3)
    assert [(s[0], s[5]) for s in recent_sends(st, "u")] == [(T0, "a b"), (T0 + 1, None)]


def test_records_of_earlier_builds_are_read_and_continued() -> None:
    key = "0123456789abcdef0123456789abcdef"
    st = new_state()
    st["recent"] = [f"{T0 + i} j s push {key} e{i}" for i in range(9)] + [[T0 + 9, "j", "s", "sms", key, None]]
    assert recent_sends(st, "u")[-1] == (T0 + 9, "j", "s", "sms", key, None)
    push_recent(st, recent_send(T0 + 10, "j", "s", "push", 3, 1, None), 10)
    got = recent_sends(st, "u")
    assert len(got) == 10 and got[0][0] == T0 + 1 and got[-2] == (T0 + 9, "j", "s", "sms", key, None)
    assert got[-1][4] != key and len(got[-1][4]) == 32
