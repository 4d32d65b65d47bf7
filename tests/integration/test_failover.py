"""Two workers, one killed with SIGKILL mid-stream: the other takes over its partitions, and every
expected send appears exactly once on the channel topic, equal to `nudgeflow simulate`'s."""

from __future__ import annotations

import random
import time
from typing import Any

import orjson
import pytest

from nudgeflow.broker import EmbeddedBroker
from tests.integration.conftest import HERE, Client, Worker, new_worker, send_view, simulated_sends, wait_for

pytestmark = pytest.mark.integration


def partitions_of(w: Worker) -> set[str]:
    return {lab["partition"] for n, lab, _ in w.samples() if n == "nudgeflow_pending_timers"}


def test_sigkill_one_of_two_workers(broker: EmbeddedBroker, tmp_path_factory: pytest.TempPathFactory) -> None:
    tmp = tmp_path_factory.mktemp("failover")
    w1 = new_worker(broker, tmp, HERE / "journeys_slow")
    w2 = Worker(broker, w1.topics, w1.app_id, tmp / "data-w2", w1.journeys, tmp / "w2.log")
    w1.start()
    w2.start()
    try:
        assert wait_for(lambda: len(partitions_of(w1)) == 2 and len(partitions_of(w2)) == 2, timeout=60), (
            partitions_of(w1),
            partitions_of(w2),
        )
        rng = random.Random(11)
        t0 = int(time.time() * 1000) + 1000
        events: list[dict[str, Any]] = []
        for i in range(80):
            user, t = f"fo-{i:02d}", t0 + rng.randrange(0, 3000)
            events.append({"user_id": user, "event": "add_to_cart", "ts": t, "props": {"product": f"sku-{i}"}})
            if i % 3 == 0:
                events.append({"user_id": user, "event": "charged", "ts": t + rng.randrange(100, 5000)})
        events.sort(key=lambda e: e["ts"])
        path = tmp / "events.jsonl"
        path.write_bytes(b"".join(orjson.dumps(e) + b"\n" for e in events))
        client = Client(broker, w1.topics)
        for e in events:
            client.producer.produce(w1.topics.name(e["event"]), key=e["user_id"].encode(), value=orjson.dumps(e))
        client.producer.flush(10)
        # both workers have entered their users, timers are pending (the wait is 6 s): kill one
        assert wait_for(
            lambda: w1.metric("nudgeflow_journey_entries_total") + w2.metric("nudgeflow_journey_entries_total") >= 80,
            timeout=30,
        )
        killed_partitions = partitions_of(w1)
        w1.kill()
        assert time.time() * 1000 < t0 + 6000, "the kill must happen while timers are pending"
        assert wait_for(lambda: len(partitions_of(w2)) == 4, timeout=90), "w2 did not take over"

        expected = simulated_sends(path, HERE / "journeys_slow")
        msgs = client.read(w1.topics.channel("push"), min_count=len(expected), timeout=90)
        got = [orjson.loads(m.value()) for m in msgs]

        assert len(got) == len({s["key"] for s in got}), "a send was duplicated"
        assert sorted(map(send_view, got)) == sorted(map(send_view, expected))
        assert 40 < len(expected) < 80 and killed_partitions
    finally:
        w1.stop()
        w2.stop()
