"""Journey edits and per-user faults with a real worker (issue: an edit without a version bump
must not crash the worker).

1. v1 `wait_a 3s -> push_a -> wait_b 12s -> sms_b`; five users reach wait_b; the worker stops;
   the file loses wait_b/sms_b but keeps `version: 1`. The restart is refused with a message that
   names the journey and the fix; with NUDGEFLOW_ACCEPT_EDITED_JOURNEYS the five leave with
   step_removed, nobody gets sms_b, and another journey's sends are not held up meanwhile.
2. An engine fault injected for one user quarantines that user only; `nudgeflow release` after
   the fix applies what was parked.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import orjson
import pytest

from nudgeflow.broker import EmbeddedBroker
from tests.integration.conftest import HERE, Client, journeys_dir, new_worker, wait_for

pytestmark = pytest.mark.integration

EDIT_V1 = """journey: edit
name: edited without a bump
version: 1
entry: {event: go}
steps:
  wait_a: {wait: 3s}
  push_a: {send: push, title: "a for {{ user.id }}"}
  wait_b: {wait: 12s}
  sms_b: {send: sms, text: b}
"""
EDIT_SAME_VERSION = EDIT_V1.split("  wait_b:")[0]  # wait_b and sms_b removed, still version 1
OTHER = """journey: other
name: answers at once
entry: {event: ping}
steps:
  pong: {send: push, title: pong}
"""


def titles(client: Client, channel: str, n: int = 0, timeout: float = 60) -> list[str]:
    msgs = client.read(client.topics.channel(channel), min_count=n, timeout=timeout)
    return sorted(orjson.loads(m.value())["content"].get("title") or "text" for m in msgs)


def test_same_version_edit_is_refused_then_accepted_users_on_removed_steps_leave(
    broker: EmbeddedBroker, tmp_path: Path
) -> None:
    journeys = journeys_dir(tmp_path, edit=EDIT_V1, other=OTHER)
    w = new_worker(broker, tmp_path, journeys).start()
    client = Client(broker, w.topics)
    users = [f"e{i}" for i in range(5)]
    try:
        for u in users:
            client.produce("custom_events", u, {"user_id": u, "event": "go", "ts": int(time.time() * 1000)})
        assert titles(client, "push", 5) == sorted(f"a for {u}" for u in users)  # all five wait in wait_b now
        w.stop()

        (journeys / "edit.yaml").write_text(EDIT_SAME_VERSION)
        with pytest.raises(RuntimeError) as refused:
            w.start()
        text = str(refused.value)
        assert "journey 'edit'" in text and "version is still 1" in text and "NUDGEFLOW_ACCEPT_EDITED_JOURNEYS" in text
        assert "Traceback" not in text

        w.extra_env["NUDGEFLOW_ACCEPT_EDITED_JOURNEYS"] = "true"
        w.start()
        t0 = time.monotonic()
        client.produce("custom_events", "p1", {"user_id": "p1", "event": "ping", "ts": int(time.time() * 1000)})
        assert "pong" in titles(client, "push", 6)
        pong_s = time.monotonic() - t0
        assert pong_s < 10, f"another journey's send took {pong_s:.1f}s"
        assert wait_for(lambda: w.metric("nudgeflow_journey_exits_total", reason="step_removed") == 5, timeout=60)
        assert w.proc is not None and w.proc.poll() is None  # still running
        assert client.read(client.topics.channel("sms")) == []
        digest = next(
            lab["digest"] for n, lab, _ in w.samples() if n == "nudgeflow_journey_info" and lab["journey"] == "edit"
        )
        assert len(digest) == 16
    finally:
        w.stop()


def test_an_engine_fault_quarantines_one_user_and_release_applies_their_input(
    broker: EmbeddedBroker, tmp_path: Path
) -> None:
    w = new_worker(broker, tmp_path, HERE / "journeys")
    w.module = "tests.integration.faulty_worker"
    w.start()
    client = Client(broker, w.topics)
    users = ["boom-1", *[f"ok-{i}" for i in range(5)]]
    try:
        for u in users:
            client.produce("add_to_cart", u, {"user_id": u, "ts": int(time.time() * 1000), "props": {"product": u}})
        pushes = titles(client, "push", 5)
        assert pushes == sorted(f"Still thinking about ok-{i}?" for i in range(5))
        assert wait_for(lambda: w.metric("nudgeflow_users_quarantined_total") == 1)
        assert w.metric("nudgeflow_quarantine_parked_inputs_total", outcome="parked") == 1
        assert w.proc is not None and w.proc.poll() is None
        log = w.log.read_text()
        assert "user boom-1 quarantined: RuntimeError" in log and "injected engine fault" not in log

        w.stop()  # the fix is deployed: the same worker without the fault
        w.module = "nudgeflow.cli"
        w.start()
        env = {"NUDGEFLOW_BROKER": f"kafka://{broker.bootstrap}", "NUDGEFLOW_TOPIC_PREFIX": w.topics.prefix}
        out = subprocess.run(
            [sys.executable, "-m", "nudgeflow.cli", "release", "--user", "boom-1"],
            env={**w.env(), **env},
            capture_output=True,
            text=True,
            check=True,
        )
        assert "release 1 user(s)" in out.stdout
        assert "Still thinking about boom-1?" in titles(client, "push", 6)
        assert wait_for(lambda: w.metric("nudgeflow_users_released_total") == 1)
    finally:
        w.stop()
