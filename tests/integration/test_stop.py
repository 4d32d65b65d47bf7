"""SIGTERM and SIGINT stop a worker within 10 s with exit code 0 and no traceback, and what it
had applied is kept: a restart sends nothing twice."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import orjson
import pytest

from nudgeflow.broker import EmbeddedBroker
from tests.integration.conftest import HERE, Client, new_worker

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_stops_the_worker_cleanly(broker: EmbeddedBroker, tmp_path: Path, sig: signal.Signals) -> None:
    w = new_worker(broker, tmp_path, HERE / "journeys").start()
    client = Client(broker, w.topics)
    try:
        now = int(time.time() * 1000)
        for i in range(3):
            client.produce("add_to_cart", f"s{i}", {"user_id": f"s{i}", "ts": now, "props": {"product": "p"}})
        assert len(client.read(client.topics.channel("push"), min_count=3, timeout=60)) == 3
        assert w.proc is not None
        t0 = time.monotonic()
        w.proc.send_signal(sig)
        code = w.proc.wait(30)
        took = time.monotonic() - t0
        err = w.log.with_suffix(".err").read_text()
        assert code == 0 and took < 10, (code, took)
        assert "Traceback" not in err and "Traceback" not in w.log.read_text()
        w.start()
        time.sleep(2)  # a restart replays nothing it had applied (nothing to wait for: absence)
        keys = [orjson.loads(m.value())["key"] for m in client.read(client.topics.channel("push"), min_count=3)]
        assert len(keys) == len(set(keys)) == 3
    finally:
        w.stop()


def test_a_worker_stops_within_10_s_when_the_broker_does_not_answer(tmp_path: Path) -> None:
    own = EmbeddedBroker(log_path=tmp_path / "tansu.log").start()  # frozen below: not the shared one
    w = new_worker(own, tmp_path, HERE / "journeys").start()
    try:
        assert own.proc is not None and w.proc is not None
        own.proc.send_signal(signal.SIGSTOP)
        t0 = time.monotonic()
        w.proc.send_signal(signal.SIGTERM)
        code = w.proc.wait(30)
        took = time.monotonic() - t0
        assert code == 0 and took < 10, (code, took)
        assert "Traceback" not in w.log.with_suffix(".err").read_text()
    finally:
        if own.proc is not None:
            own.proc.send_signal(signal.SIGCONT)
        w.stop()
        own.stop()
