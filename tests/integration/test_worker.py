"""A real worker on the embedded broker: events in, send requests out, dead letters, metrics."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from nudgeflow.broker import EmbeddedBroker
from tests.integration.conftest import HERE, Client, Worker, new_worker, wait_for

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def worker(broker: EmbeddedBroker, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Worker]:
    w = new_worker(broker, tmp_path_factory.mktemp("worker"), HERE / "journeys").start()
    yield w
    w.stop()


@pytest.fixture(scope="module")
def client(broker: EmbeddedBroker, worker: Worker) -> Client:
    return Client(broker, worker.topics)


def now_ms() -> int:
    return int(time.time() * 1000)


def pushes_for(client: Client, user: str, min_count: int = 0, timeout: float = 30) -> list[dict[str, Any]]:
    """The push send requests for one user, waiting until there are at least min_count."""
    deadline = time.monotonic() + timeout
    while True:
        msgs = client.read(client.topics.channel("push"))
        mine = [orjson.loads(m.value()) for m in msgs if m.key() == user.encode()]
        if len(mine) >= min_count or time.monotonic() >= deadline:
            return mine
        time.sleep(0.5)


def test_events_reach_the_worker_and_are_counted(worker: Worker, client: Client) -> None:
    for i in range(20):
        client.produce("page_viewed", f"viewer-{i}", {"user_id": f"viewer-{i}", "ts": now_ms(), "props": {"url": "/"}})
    assert wait_for(lambda: worker.metric("nudgeflow_events_consumed_total", topic="page_viewed") >= 20)
    assert worker.metric("nudgeflow_events_consumed_total", topic="page_viewed") == 20


def test_abandoned_cart_gets_exactly_one_push_after_the_wait(worker: Worker, client: Client) -> None:
    t = now_ms()
    client.produce(
        "add_to_cart",
        "shopper-1",
        {"user_id": "shopper-1", "ts": t, "event_id": "atc-1", "props": {"product": "Red hoodie"}},
    )
    assert wait_for(lambda: worker.metric("nudgeflow_journey_entries_total", journey="test-cart") >= 1)
    (push,) = pushes_for(client, "shopper-1", min_count=1)
    assert push["content"]["title"] == "Still thinking about Red hoodie?"
    assert push["channel"] == "push" and push["journey"] == "test-cart" and push["step"] == "push_offer"
    assert push["created_at"] == t + 3000 and push["trigger_event_id"] == "atc-1" and len(push["key"]) == 32
    assert time.time() * 1000 >= t + 3000  # not before the wait was over
    time.sleep(2)
    assert len(pushes_for(client, "shopper-1")) == 1
    assert worker.metric("nudgeflow_send_requests_total", channel="push", journey="test-cart") >= 1


def test_charged_before_the_deadline_converts_and_sends_nothing(worker: Worker, client: Client) -> None:
    before = worker.metric("nudgeflow_journey_conversions_total", journey="test-cart")
    t = now_ms()
    client.produce("add_to_cart", "buyer-1", {"user_id": "buyer-1", "ts": t, "props": {"product": "Mug"}})
    client.produce("charged", "buyer-1", {"user_id": "buyer-1", "ts": t + 500, "props": {"amount": 12}})
    assert wait_for(lambda: worker.metric("nudgeflow_journey_conversions_total", journey="test-cart") == before + 1)
    time.sleep(5)  # well past the 3 s wait
    assert pushes_for(client, "buyer-1", timeout=0) == []
    assert worker.metric("nudgeflow_journey_exits_total", journey="test-cart", reason="converted") >= 1


def test_malformed_message_goes_to_dead_letter_and_the_worker_carries_on(worker: Worker, client: Client) -> None:
    bad = b'{"user_id": "x", "ts": "not a time"'
    client.produce("add_to_cart", "x", bad)
    client.produce("add_to_cart", "x", {"props": {"no": "user"}})
    dead = client.read(client.topics.dead_letter, min_count=2)
    reasons = {dict(m.headers())["reason"] for m in dead}
    assert reasons == {b"not_json", b"missing_user_id"}
    assert bad in [m.value() for m in dead]
    assert all(dict(m.headers())["source_topic"] == client.topics.name("add_to_cart").encode() for m in dead)
    assert wait_for(lambda: worker.metric("nudgeflow_invalid_events_total", reason="not_json") == 1)
    assert worker.metric("nudgeflow_invalid_events_total", reason="missing_user_id") == 1
    # still alive and working
    client.produce("add_to_cart", "after-bad", {"user_id": "after-bad", "ts": now_ms(), "props": {"product": "Cap"}})
    assert len(pushes_for(client, "after-bad", min_count=1)) == 1
    assert worker.proc is not None and worker.proc.poll() is None


def test_metrics_endpoint_serves_the_documented_families(worker: Worker) -> None:
    names = {n for n, _, _ in worker.samples()}
    for family in (
        "nudgeflow_events_consumed_total",
        "nudgeflow_invalid_events_total",
        "nudgeflow_journey_entries_total",
        "nudgeflow_journey_exits_total",
        "nudgeflow_journey_conversions_total",
        "nudgeflow_send_requests_total",
        "nudgeflow_pending_timers",
        "nudgeflow_timer_lateness_seconds_bucket",
        "nudgeflow_batch_seconds_bucket",
    ):
        assert family in names, family
    assert Path(worker.log).exists()
