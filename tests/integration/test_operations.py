"""What an SRE watches, on real parts: the worker's /healthz and /readyz, and a real Prometheus
server scraping a running worker and finding the key series with sensible values."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import httpx
import orjson
import pytest

from nudgeflow.broker import EmbeddedBroker, die_with_parent, free_port
from tests.integration.conftest import HERE, Client, new_worker, wait_for

pytestmark = pytest.mark.integration


def test_health_and_readiness_endpoints(broker: EmbeddedBroker, tmp_path: Path) -> None:
    w = new_worker(broker, tmp_path, HERE / "journeys").start()
    try:
        base = f"http://127.0.0.1:{w.metrics_port}"
        assert wait_for(lambda: httpx.get(f"{base}/readyz", timeout=2).status_code == 200)
        ready = httpx.get(f"{base}/readyz", timeout=2)
        assert ready.text.startswith("ok: partitions")
        assert httpx.get(f"{base}/healthz", timeout=2).status_code == 200
        assert httpx.get(f"{base}/nope", timeout=2).status_code == 404
        metrics = httpx.get(f"{base}/metrics", timeout=2).text
        assert "nudgeflow_build_info{" in metrics and "_created" not in metrics
    finally:
        w.stop()


def test_a_real_prometheus_scrapes_the_worker(broker: EmbeddedBroker, tmp_path: Path) -> None:
    binary = shutil.which("prometheus")
    if binary is None:
        if os.environ.get("REQUIRE_DEPLOY_TOOLS"):
            raise AssertionError("prometheus is not installed (.ci/run installs it)")
        pytest.skip("prometheus not installed (Debian: apt-get install prometheus)")
    w = new_worker(broker, tmp_path, HERE / "journeys").start()
    port = free_port()
    (tmp_path / "prometheus.yml").write_text(
        f"""global: {{scrape_interval: 1s, evaluation_interval: 1s}}
scrape_configs:
  - job_name: nudgeflow
    static_configs: [{{targets: ["127.0.0.1:{w.metrics_port}"]}}]
"""
    )
    prom = subprocess.Popen(
        [
            binary,
            f"--config.file={tmp_path / 'prometheus.yml'}",
            f"--storage.tsdb.path={tmp_path / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=open(tmp_path / "prometheus.log", "wb"),  # noqa: SIM115 - the child keeps it
        preexec_fn=die_with_parent,
    )

    def query(q: str) -> list[dict[str, object]]:
        try:
            r = httpx.get(f"http://127.0.0.1:{port}/api/v1/query", params={"query": q}, timeout=3)
            result: list[dict[str, object]] = r.json()["data"]["result"]
            return result
        except (httpx.HTTPError, ValueError, KeyError):
            return []

    def value(q: str) -> float:
        res = query(q)
        return float(res[0]["value"][1]) if res else float("nan")  # type: ignore[index]

    try:
        client = Client(broker, w.topics)
        now = int(time.time() * 1000)
        for i in range(20):
            client.produce("add_to_cart", f"p{i}", {"user_id": f"p{i}", "ts": now, "props": {"product": "p"}})
        assert wait_for(lambda: value('up{job="nudgeflow"}') == 1, timeout=60)
        assert wait_for(lambda: value('sum(nudgeflow_events_consumed_total{topic="add_to_cart"})') == 20, timeout=60)
        assert wait_for(lambda: value("sum(nudgeflow_timers_fired_total)") == 20, timeout=30)  # 3 s waits
        assert wait_for(lambda: value('sum(nudgeflow_send_requests_total{channel="push"})') == 20, timeout=30)
        assert value("sum(nudgeflow_pending_timers)") == 0
        assert value('sum(nudgeflow_send_requests_total{step="push_offer"})') == 20
        assert (
            0 < value("histogram_quantile(0.5, sum by (le) (nudgeflow_send_latency_seconds_bucket))") <= 2
        )  # due -> out
        assert value("sum(nudgeflow_rebalances_total)") >= 1 and value("sum(nudgeflow_assigned_partitions)") == 4
        assert wait_for(lambda: value('sum(nudgeflow_consumer_lag_messages{topic="add_to_cart"})') == 0, timeout=30)
        assert value("sum(nudgeflow_build_info)") == 1
        if os.environ.get("REQUIRE_COMPILED"):  # CI: the worker runs the compiled modules
            assert value('count(nudgeflow_build_info{compiled="12/12"})') == 1
        assert value('count(nudgeflow_journey_info{journey="test-cart"})') == 1
        assert value("max(nudgeflow_event_time_lag_seconds)") >= 0
    finally:
        prom.terminate()
        prom.wait(10)
        w.stop()


def test_a_sites_own_topic_stands_in_for_an_input(broker: EmbeddedBroker, tmp_path: Path) -> None:
    w = new_worker(broker, tmp_path, HERE / "journeys")
    site_topic = f"{w.topics.prefix}site.cart-events"
    w.extra_env = {"NUDGEFLOW_INPUT_TOPICS": f"add_to_cart={site_topic}"}
    w.start()
    try:
        client = Client(broker, w.topics)
        now = int(time.time() * 1000)
        client.producer.produce(
            site_topic, key=b"site-u1", value=orjson.dumps({"user_id": "site-u1", "ts": now, "props": {"product": "p"}})
        )
        client.producer.flush(10)
        (push,) = client.read(client.topics.channel("push"), min_count=1, timeout=60)
        assert push.key() == b"site-u1"
        assert wait_for(lambda: w.metric("nudgeflow_events_consumed_total", topic="add_to_cart") == 1)
    finally:
        w.stop()
