"""Checkpoints span batches: a user active in many batches of one checkpoint is written to the
changelog once per checkpoint, not once per batch, and the sends are what they would be anyway."""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path

import orjson
import pytest

from nudgeflow.agents.app import TABLE
from nudgeflow.agents.keys import USER
from nudgeflow.broker import EmbeddedBroker
from tests.integration.conftest import HERE, Client, new_worker, wait_for

pytestmark = pytest.mark.integration
USERS, CARTS = 4, 50


def test_a_backlog_applied_in_many_batches_writes_each_user_once_per_checkpoint(
    broker: EmbeddedBroker, tmp_path: Path
) -> None:
    w = new_worker(broker, tmp_path, HERE / "journeys")
    w.extra_env = {"NUDGEFLOW_BATCH_MAX": "10", "NUDGEFLOW_CHECKPOINT_MS": "600000"}
    client = Client(broker, w.topics)
    t0 = int(time.time() * 1000) - 60_000  # a backlog: every wait is over by the time it is read
    for i in range(CARTS):
        for u in range(USERS):
            user = f"shopper-{u}"
            client.produce("add_to_cart", user, {"user_id": user, "ts": t0 + i, "props": {"product": f"p{i}"}})
    w.start()
    try:
        push = client.topics.channel("push")
        msgs = client.read(push, min_count=USERS, timeout=60)
        # each cart restarted the journey: only the last one's wait ran out, once per user
        got = sorted((m.key().decode(), orjson.loads(m.value())["content"]["title"]) for m in msgs)
        assert got == [(f"shopper-{u}", f"Still thinking about p{CARTS - 1}?") for u in range(USERS)]
        assert wait_for(lambda: w.metric("nudgeflow_events_consumed_total", topic="add_to_cart") == USERS * CARTS)
        assert w.metric("nudgeflow_batch_size_count") >= USERS * CARTS / 10  # at least 20 batches
        changelog = client.read(f"{w.app_id}-{TABLE}-changelog", timeout=30)
        writes = Counter(m.key() for m in changelog if m.key().startswith(USER))
        assert len(writes) == USERS
        # one write per batch would be ~20 per user (every batch of 10 holds each of them), plus
        # the timer's; a checkpoint writes each once, and the input ran dry at most a few times
        assert max(writes.values()) <= 5, writes
    finally:
        w.stop()
