"""Hostile inputs against a real worker: nothing is lost, nothing takes the worker down.

Every message is applied or in the dead-letter topic with a reason: a 900 KB and a 5 MB event
(as stubs: they do not fit a dead-letter message), nesting 300 levels deep, keys that are not
the user id. Valid events around them are applied.
"""

from __future__ import annotations

import time
from pathlib import Path

import orjson
import pytest
from confluent_kafka import Producer

from nudgeflow.broker import EmbeddedBroker, ensure_topics
from nudgeflow.worker import all_topics
from tests.integration.conftest import HERE, PARTITIONS, Client, Worker, new_worker, wait_for

pytestmark = pytest.mark.integration


def test_oversized_deep_and_mis_keyed_inputs_are_dead_lettered_and_the_rest_applied(
    broker: EmbeddedBroker, tmp_path: Path
) -> None:
    w = new_worker(broker, tmp_path, HERE / "journeys").start()
    client = Client(broker, w.topics)
    big = Producer({"bootstrap.servers": broker.bootstrap, "message.max.bytes": 8 * 2**20, "log_level": 3})
    topic = w.topics.name("add_to_cart")
    now = int(time.time() * 1000)
    try:
        for size in (900_000, 5_000_000):
            doc = {"user_id": f"big-{size}", "ts": now, "props": {"blob": "x" * size}}
            big.produce(topic, key=f"big-{size}".encode(), value=orjson.dumps(doc), headers=[("trace", b"t-1")])
        assert big.flush(30) == 0
        deep = b'{"user_id": "deep", "ts": %d, "props": ' % now + b'{"a": ' * 300 + b"1" + b"}" * 301
        client.produce("add_to_cart", "deep", deep)
        for i in range(20):  # keyed by session, not by user: would split the user across partitions
            client.producer.produce(
                topic, key=f"session-{i}".encode(), value=orjson.dumps({"user_id": f"mm-{i}", "ts": now})
            )
        for i in range(5):
            client.produce("add_to_cart", f"ok-{i}", {"user_id": f"ok-{i}", "ts": now, "props": {"product": "p"}})
        pushes = client.read(client.topics.channel("push"), min_count=5, timeout=60)
        assert sorted(m.key() for m in pushes) == [f"ok-{i}".encode() for i in range(5)]
        dead = client.read(client.topics.dead_letter, min_count=23, timeout=60)
        reasons = sorted(dict(m.headers())["reason"].decode() for m in dead)
        assert reasons == ["key_mismatch"] * 20 + ["too_deep"] + ["too_large"] * 2
        stubs = [orjson.loads(m.value()) for m in dead if dict(m.headers()).get("stub") == b"1"]
        assert all(dict(m.headers())["original.trace"] == b"t-1" for m in dead if m.key().startswith(b"big-"))
        assert sorted(s["value_bytes"] for s in stubs) == sorted(
            len(orjson.dumps({"user_id": f"big-{n}", "ts": now, "props": {"blob": "x" * n}}))
            for n in (900_000, 5_000_000)
        )
        assert wait_for(lambda: w.metric("nudgeflow_invalid_events_total") == 23)
        assert w.proc is not None and w.proc.poll() is None
    finally:
        w.stop()


def test_a_data_dir_of_a_broker_that_is_gone_is_not_trusted(tmp_path: Path) -> None:
    """An in-memory broker restarted: the old data dir's applied offsets mean nothing on the new one.
    (Before: every event of a known user was dropped as a duplicate.)"""
    users = [f"r{i}" for i in range(5)]
    first: Worker | None = None
    for round_ in range(2):
        with EmbeddedBroker(log_path=tmp_path / f"tansu-{round_}.log").start() as b:
            w = new_worker(b, tmp_path, HERE / "journeys")
            if first is not None:  # the same worker (data dir, group, topics) on the new broker
                w.data_dir, w.app_id, w.topics = first.data_dir, first.app_id, first.topics
                ensure_topics(b.bootstrap, all_topics(w.topics), PARTITIONS, 86_400_000, copartitioned=w.topics.inputs)
            first = w
            w.start()
            client = Client(b, w.topics)
            try:
                now = int(time.time() * 1000)
                for u in users:
                    client.produce("add_to_cart", u, {"user_id": u, "ts": now, "props": {"product": "p"}})
                pushes = client.read(client.topics.channel("push"), min_count=5, timeout=60)
                assert sorted(m.key().decode() for m in pushes) == users, f"round {round_}"
                assert w.metric("nudgeflow_duplicate_inputs_total") == 0
            finally:
                w.stop()
