"""The worker produces the same send requests as `nudgeflow simulate` for the same input."""

from __future__ import annotations

import random
import time

import orjson
import pytest

from nudgeflow.broker import EmbeddedBroker
from tests.integration.conftest import HERE, Client, new_worker, send_view, simulated_sends

pytestmark = pytest.mark.integration


def test_worker_matches_simulate(broker: EmbeddedBroker, tmp_path_factory: pytest.TempPathFactory) -> None:
    tmp = tmp_path_factory.mktemp("equiv")
    rng = random.Random(3)
    t0 = int(time.time() * 1000) + 2000
    events = []
    for i in range(60):  # carts; a third bought within the 3 s wait, a sixth bought after it
        user, t = f"eq-{i:02d}", t0 + rng.randrange(0, 2000)
        events.append({"user_id": user, "event": "add_to_cart", "ts": t, "props": {"product": f"sku-{i}"}})
        if i % 3 == 0:
            events.append({"user_id": user, "event": "charged", "ts": t + rng.randrange(100, 2500)})
        elif i % 6 == 1:
            events.append({"user_id": user, "event": "charged", "ts": t + 3000 + rng.randrange(500, 3000)})
    events.sort(key=lambda e: e["ts"])
    path = tmp / "events.jsonl"
    path.write_bytes(b"".join(orjson.dumps(e) + b"\n" for e in events))

    w = new_worker(broker, tmp, HERE / "journeys").start()
    client = Client(broker, w.topics)
    try:
        for e in events:  # produced in time order, each on its own topic, as a site would
            client.producer.produce(
                w.topics.name(str(e["event"])), key=str(e["user_id"]).encode(), value=orjson.dumps(e)
            )
            client.producer.poll(0)
        client.producer.flush(10)
        expected = simulated_sends(path, HERE / "journeys")
        assert 20 < len(expected) < 60
        msgs = client.read(w.topics.channel("push"), min_count=len(expected), timeout=60)
        got = [orjson.loads(m.value()) for m in msgs]

        assert sorted(map(send_view, got)) == sorted(map(send_view, expected))
    finally:
        w.stop()
