"""Crash safety: SIGKILL with pending timers; restart with an empty data dir (restore from changelog).

Every expected push appears exactly once on the channel topic: none lost, none duplicated.
"""

from __future__ import annotations

import shutil
import time
from collections import Counter

import orjson
import pytest

from nudgeflow.broker import EmbeddedBroker
from tests.integration.conftest import HERE, Client, Worker, new_worker, wait_for

pytestmark = pytest.mark.integration
WAIT_MS = 6000


def add_to_cart(client: Client, user: str) -> int:
    t = int(time.time() * 1000)
    client.produce("add_to_cart", user, {"user_id": user, "ts": t, "props": {"product": f"item-of-{user}"}})
    return t


def pushes(client: Client, min_count: int) -> Counter[str]:
    msgs = client.read(client.topics.channel("push"), min_count=min_count, timeout=60)
    keys = Counter(orjson.loads(m.value())["key"] for m in msgs)
    assert all(n == 1 for n in keys.values()), f"duplicate send keys: {keys}"
    return Counter(m.key().decode() for m in msgs)


def entered(worker: Worker, n: int) -> bool:
    return wait_for(lambda: worker.metric("nudgeflow_journey_entries_total") >= n, timeout=30)


@pytest.mark.parametrize("wipe", [False, True], ids=["same-data-dir", "empty-data-dir"])
def test_sigkill_then_restart_fires_each_pending_timer_exactly_once(
    broker: EmbeddedBroker, tmp_path_factory: pytest.TempPathFactory, wipe: bool
) -> None:
    w = new_worker(broker, tmp_path_factory.mktemp("crash"), HERE / "journeys_slow").start()
    client = Client(broker, w.topics)
    try:
        add_to_cart(client, "early")  # its push goes out before the crash
        assert pushes(client, 1) == {"early": 1}
        t = add_to_cart(client, "pending")  # its timer is pending when the worker dies
        assert entered(w, 2)
        w.kill()
        assert time.time() * 1000 < t + WAIT_MS, "the kill must happen while the timer is pending"
        if wipe:
            shutil.rmtree(w.data_dir)
        w.start()
        assert pushes(client, 2) == {"early": 1, "pending": 1}
        time.sleep(3)  # nothing more arrives later (e.g. a replayed tick)
        assert pushes(client, 2) == {"early": 1, "pending": 1}
        push = next(
            orjson.loads(m.value()) for m in client.read(client.topics.channel("push")) if m.key() == b"pending"
        )
        assert push["created_at"] == t + WAIT_MS and push["content"]["title"] == "Still thinking about item-of-pending?"
    finally:
        w.stop()
