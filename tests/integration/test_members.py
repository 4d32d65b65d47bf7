"""A segment journey with `include_current_members`, added to a running product: the worker scans
the users it already holds, admits the segment's members once, and a restart in the middle of the
scan carries on without admitting anyone twice (issue 13, case 1)."""

from __future__ import annotations

import time
from pathlib import Path

import orjson
import pytest

from nudgeflow.broker import EmbeddedBroker
from tests.integration.conftest import Client, journeys_dir, new_worker, wait_for

pytestmark = pytest.mark.integration

SEGMENTS = "segments:\n  buyer: {has_done: charged}\n"
OTHER = """journey: other
name: answers at once
entry: {event: ping}
steps:
  pong: {send: push, title: pong}
"""
MEMBERS = """journey: members
name: thank every buyer
entry: {segment_entered: buyer, include_current_members: true}
steps:
  thanks: {send: email, subject: "Thanks {{ user.id }}"}
"""


def test_current_members_are_admitted_by_a_paced_scan_that_survives_a_restart(
    broker: EmbeddedBroker, tmp_path: Path
) -> None:
    journeys = journeys_dir(tmp_path, segments=SEGMENTS, other=OTHER)
    w = new_worker(broker, tmp_path, journeys)
    w.extra_env["NUDGEFLOW_MEMBER_SCAN_RATE"] = "4"  # 40 users: a scan of about ten seconds
    w.start()
    client = Client(broker, w.topics)
    buyers = [f"b{i:02d}" for i in range(40)]
    now = int(time.time() * 1000)
    try:
        for u in buyers:
            client.produce("charged", u, {"user_id": u, "ts": now, "props": {"amount": 10}})
        for u in ("n1", "n2"):  # known users, not buyers
            client.produce("custom_events", u, {"user_id": u, "event": "ping", "ts": now})
        assert len(client.read(client.topics.channel("push"), min_count=2, timeout=60)) == 2
        assert wait_for(lambda: w.metric("nudgeflow_events_consumed_total") >= 42, timeout=60)
        w.stop()

        (journeys / "members.yaml").write_text(MEMBERS)
        w.start()
        assert wait_for(
            lambda: w.metric("nudgeflow_member_scan_users_total", journey="members", outcome="admitted") >= 8,
            timeout=60,
        )
        w.kill()  # in the middle of the scan
        w.start()
        email = client.topics.channel("email")
        assert wait_for(lambda: len({m.key() for m in client.read(email)}) >= 40, timeout=90)
        assert wait_for(lambda: w.metric("nudgeflow_member_scans_running", journey="members") == 0, timeout=60)
        sends = [orjson.loads(m.value()) for m in client.read(email)]
        assert sorted({s["user_id"] for s in sends}) == buyers  # every buyer, nobody else
        assert len({s["key"] for s in sends}) == 40  # one send each (a replay repeats a key, never a new one)

        w.stop()
        w.start()  # the scan is done: a restart admits nobody again
        client.produce("custom_events", "n3", {"user_id": "n3", "event": "ping", "ts": int(time.time() * 1000)})
        assert len(client.read(client.topics.channel("push"), min_count=3, timeout=60)) == 3
        assert len({orjson.loads(m.value())["key"] for m in client.read(email)}) == 40
        assert w.metric("nudgeflow_member_scan_users_total", journey="members", outcome="checked") == 0
    finally:
        w.stop()


LAPSED = """journey: lapsed
name: we miss you
entry: {segment_entered: quiet}
steps:
  miss_you: {send: email, subject: "We miss you {{ user.id }}"}
"""


def test_a_time_driven_segment_enters_users_with_no_new_input(broker: EmbeddedBroker, tmp_path: Path) -> None:
    """`not: {has_done: ping, within: 3s}`: three seconds after the last ping the user is in the
    segment again, from the durable timer index alone (issue 13, case 2)."""
    segments = "segments:\n  quiet: {not: {has_done: ping, within: 3s}}\n"
    w = new_worker(broker, tmp_path, journeys_dir(tmp_path, segments=segments, lapsed=LAPSED)).start()
    client = Client(broker, w.topics)
    try:
        now = int(time.time() * 1000)
        for u in ("q1", "q2"):
            client.produce("custom_events", u, {"user_id": u, "event": "ping", "ts": now})
        client.produce("custom_events", "q2", {"user_id": "q2", "event": "ping", "ts": now + 2000})
        sends = [orjson.loads(m.value()) for m in client.read(client.topics.channel("email"), min_count=2, timeout=60)]
        by_user = {s["user_id"]: s["created_at"] for s in sends}
        assert by_user == {"q1": now + 3001, "q2": now + 5001}  # the window edges, exactly
    finally:
        w.stop()
