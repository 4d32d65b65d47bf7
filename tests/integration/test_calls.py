"""`call` steps in the worker: the call runner hits a real local HTTP server and the answer resumes
the journey (the saved body personalises the next message; an error takes on_error)."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

import orjson
import pytest

from nudgeflow.broker import EmbeddedBroker, die_with_parent
from tests.integration.conftest import HERE, Client, new_worker, wait_for

pytestmark = pytest.mark.integration
SEEN: list[str] = []


class Recs(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        url = urlparse(self.path)
        user = parse_qs(url.query).get("user", ["?"])[0]
        SEEN.append(url.path)
        if url.path == "/recs":
            body = json.dumps({"items": [{"name": f"Plan for {user}"}]}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(body)
        else:
            self.send_response(404)
            self.end_headers()

    def log_message(self, *args: object) -> None:
        return


@pytest.fixture(scope="module")
def http_server() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), Recs)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_call_step_uses_the_api_answer_and_falls_back_on_error(
    broker: EmbeddedBroker, tmp_path_factory: pytest.TempPathFactory, http_server: str
) -> None:
    w = new_worker(broker, tmp_path_factory.mktemp("calls"), HERE / "journeys_calls").start()
    runner = subprocess.Popen(
        [sys.executable, "-m", "nudgeflow.cli", "calls"],
        env=w.env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        preexec_fn=die_with_parent,
    )
    client = Client(broker, w.topics)
    try:
        t = int(time.time() * 1000)
        client.produce(
            "custom_events",
            "u-ok",
            {"user_id": "u-ok", "event": "go", "ts": t, "props": {"recs_url": f"{http_server}/recs?user=u-ok"}},
        )
        client.produce(
            "custom_events",
            "u-bad",
            {"user_id": "u-bad", "event": "go", "ts": t, "props": {"recs_url": f"{http_server}/missing?user=u-bad"}},
        )
        msgs = client.read(client.topics.channel("push"), min_count=2, timeout=60)
        titles = {m.key().decode(): orjson.loads(m.value())["content"]["title"] for m in msgs}
        assert titles == {"u-ok": "Picked for you: Plan for u-ok", "u-bad": "Our bestsellers"}
        assert sorted(SEEN) == ["/missing", "/recs"]
        results = client.read(client.topics.feedback, min_count=2)
        assert sorted(orjson.loads(m.value())["ok"] for m in results) == [False, True]
        assert wait_for(lambda: w.metric("nudgeflow_journey_step_outcomes_total", outcome="fetch:error") == 1)
    finally:
        runner.terminate()
        runner.wait(20)
        w.stop()
