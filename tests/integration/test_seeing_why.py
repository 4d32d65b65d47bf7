"""A support engineer asks a running product why a user got a message, and a marketer asks where
people drop out: `nudgeflow inspect --user` reads the state changelog, `nudgeflow stats` a worker's
/metrics, `nudgeflow graph` draws the journey with those counts (issue 13, case 6)."""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

import orjson
import pytest

from nudgeflow.broker import EmbeddedBroker
from tests.integration.conftest import Client, Worker, journeys_dir, new_worker, wait_for

pytestmark = pytest.mark.integration

CART = """journey: cart-push
name: Cart push
entry: {event: add_to_cart}
steps:
  bought_it:
    wait_for: charged
    where: {cart_id: "{{ trigger.cart_id }}"}
    timeout: 2s
    on_timeout: push
    next: end
  push: {send: push, title: "Still want cart {{ trigger.cart_id }}?"}
"""
SLOW = """journey: slow
name: a long wait
entry: {event: signed_up}
steps:
  w: {wait: 1h}
  hello: {send: email, subject: hello}
"""


def cli(w: Worker, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "nudgeflow.cli", *args], env=w.env(), capture_output=True, text=True, timeout=120
    )


def test_inspect_stats_and_graph_against_a_running_worker(broker: EmbeddedBroker, tmp_path: Path) -> None:
    journeys = journeys_dir(tmp_path, cart=CART, slow=SLOW)
    w = new_worker(broker, tmp_path, journeys).start()
    client = Client(broker, w.topics)
    now = int(time.time() * 1000)
    try:
        for u, cart, eid in (("u1", "C", "ev-1"), ("u2", "C", "ev-2"), ("u3", "D", "ev-3")):
            client.produce("add_to_cart", u, {"user_id": u, "ts": now, "event_id": eid, "props": {"cart_id": cart}})
        client.produce("charged", "u1", {"user_id": "u1", "ts": now + 100, "props": {"cart_id": "C"}})
        client.produce("charged", "u3", {"user_id": "u3", "ts": now + 100, "props": {"cart_id": "X"}})  # not D
        for u in ("s1", "s2"):
            client.produce("custom_events", u, {"user_id": u, "event": "signed_up", "ts": now})
        pushes = [orjson.loads(m.value()) for m in client.read(client.topics.channel("push"), min_count=2, timeout=60)]
        assert sorted(p["user_id"] for p in pushes) == ["u2", "u3"]
        u2 = next(p for p in pushes if p["user_id"] == "u2")

        assert wait_for(lambda: w.metric("nudgeflow_journey_exits_total") == 3)
        assert wait_for(lambda: w.metric("nudgeflow_journey_users", journey="slow", step="w") == 2)
        assert w.metric("nudgeflow_journey_users", journey="cart-push") == 0
        got = cli(w, "inspect", "--user", "u2")
        assert got.returncode == 0, got.stderr
        assert "in no journey now" in got.stdout
        assert f"cart-push/push push key {u2['key']} (trigger event ev-2)" in got.stdout
        assert "profile: {}" in got.stdout and "cart_id" not in got.stdout.split("recent sends")[0].split("entries")[1]
        missing = cli(w, "inspect", "--user", "nobody")
        assert missing.returncode == 1 and "no stored state" in missing.stdout

        url = f"http://127.0.0.1:{w.metrics_port}/metrics"
        stats = cli(w, "stats", "--counts", url, "--journeys", str(journeys))
        assert stats.returncode == 0, stats.stderr
        lines = stats.stdout.split("\n\n")[0].splitlines()
        assert lines[0] == "cart-push: entered 3, in it now 0, converted 0"
        assert "exited: completed 3" in stats.stdout and "sent: push 2" in stats.stdout
        steps = [x.split()[0] for x in lines if x.startswith("    ")]
        assert steps == ["bought_it", "push"]
        assert "performed 1" in lines[-2] and "timed_out 2" in lines[-2] and "sent_push 2" in lines[-1]

        graph = cli(w, "graph", "cart-push", "--counts", url, "--journeys", str(journeys))
        assert graph.returncode == 0, graph.stderr
        assert 's0 -- "did charged 1" --> done' in graph.stdout and 's0 -- "timed out 2" --> s1' in graph.stdout

        w.stop()  # who is where is stored with the state: a restarted worker still knows
        w.start()
        after = cli(w, "stats", "--counts", f"http://127.0.0.1:{w.metrics_port}/metrics", "--journeys", str(journeys))
        assert "slow: entered 0, in it now 2, converted 0" in after.stdout  # counters restart, the state does not
        assert re.search(r"^ +w +wait 1h +visits +0  here now +2$", after.stdout, re.M), after.stdout
    finally:
        w.stop()
