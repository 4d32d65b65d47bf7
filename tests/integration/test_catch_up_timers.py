"""A worker that restarts behind its input fires only the timers its input leaves due.

While a worker is down, carts are restarted and purchases made before the first carts' waits
end; a sender's feedback about earlier pushes arrives after those waits are overdue by the wall
clock. On restart the worker reads all of it at once: the restarted journeys push once (the
second cart's), the buyers not at all. Feedback comes in processing time and used to move the
journey clock, firing the wait ahead of the purchase read beside it (chaos check, 2026-12-07).
"""

from __future__ import annotations

import time

import orjson
import pytest

from nudgeflow.broker import EmbeddedBroker
from nudgeflow.engine.io import Feedback
from nudgeflow.streams import wire
from tests.integration.conftest import HERE, Client, new_worker, wait_for
from tests.integration.test_crash import add_to_cart, entered

pytestmark = pytest.mark.integration
WAIT_MS = 6000


def test_restart_behind_input_fires_only_what_the_input_leaves_due(
    broker: EmbeddedBroker, tmp_path_factory: pytest.TempPathFactory
) -> None:
    w = new_worker(broker, tmp_path_factory.mktemp("catchup"), HERE / "journeys_slow").start()
    client = Client(broker, w.topics)
    again, bought = [f"again{i}" for i in range(10)], [f"bought{i}" for i in range(10)]
    try:
        first = {u: add_to_cart(client, u) for u in again + bought}
        assert entered(w, len(first))
        w.kill()
        second = {u: add_to_cart(client, u) for u in again}  # restarts the journey: the first push is off
        for u in bought:
            client.produce("charged", u, {"user_id": u, "ts": int(time.time() * 1000), "props": {}})
        time.sleep(max(0.0, (max(first.values()) + WAIT_MS + 500) / 1000 - time.time()))  # overdue by the clock
        for u in bought:  # a sender's news about an earlier push, stamped now
            fb = wire.encode_feedback(Feedback(u, "push", "delivered", f"k-{u}", "test-cart-slow", "push_offer"))
            client.produce("nudgeflow.feedback", u, fb.value)
        w.start()
        assert wait_for(lambda: w.metric("nudgeflow_events_consumed_total") >= 30, timeout=60)
        assert wait_for(lambda: len(client.read(client.topics.channel("push"))) >= len(again), timeout=60)
        docs = [orjson.loads(m.value()) for m in client.read(client.topics.channel("push"))]
        assert sorted((d["user_id"], d["created_at"]) for d in docs) == sorted(
            (u, t + WAIT_MS) for u, t in second.items()
        )
    finally:
        w.stop()
