"""`call` steps in the worker: the call runner hits a real local HTTP server and the answer resumes
the journey (the saved body personalises the next message; an error takes on_error). The topics
are signed (NUDGEFLOW_TOPIC_SECRET): a forged call result changes nothing."""

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
from nudgeflow.engine.io import CallResult
from nudgeflow.streams import wire
from tests.integration.conftest import Client, new_worker, wait_for

pytestmark = pytest.mark.integration
SEEN: list[str] = []
SECRET = "integration-secret"
JOURNEY = """\
journey: test-recs
name: Recommendations from an API, or a generic message when it fails
entry:
  event: go
steps:
  fetch:
    call: "{base}/{{{{ trigger.path }}}}?user={{{{ user.id }}}}"
    save_as: recs
    timeout: 20s
    on_error: generic
  personal:
    send: push
    title: "Picked for you: {{{{ vars.recs.items[0].name }}}}"
    next: end
  generic:
    send: push
    title: "Our bestsellers"
"""


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
    tmp = tmp_path_factory.mktemp("calls")
    (tmp / "journeys").mkdir()
    (tmp / "journeys" / "recs.yaml").write_text(JOURNEY.format(base=http_server))
    w = new_worker(broker, tmp, tmp / "journeys")
    w.extra_env = {"NUDGEFLOW_TOPIC_SECRET": SECRET}
    w.start()
    runner = subprocess.Popen(
        [sys.executable, "-m", "nudgeflow.cli", "calls"],
        env={**w.env(), "NUDGEFLOW_OUTBOUND_ALLOW_NETWORKS": "127.0.0.1/32"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        preexec_fn=die_with_parent,
    )
    client = Client(broker, w.topics)
    try:
        t = int(time.time() * 1000)
        for user, path in (("u-ok", "recs"), ("u-bad", "missing"), ("u-forged", "recs")):
            client.produce("custom_events", user, {"user_id": user, "event": "go", "ts": t, "props": {"path": path}})
        calls = client.read(client.topics.calls, min_count=3, timeout=60)
        forged_key = next(orjson.loads(m.value())["key"] for m in calls if m.key() == b"u-forged")
        # a forged answer (no signature) for u-forged's call, before the real one: dead-lettered
        fake = wire.encode_call_result(CallResult("u-forged", forged_key, True, {"items": [{"name": "SCAM"}]}))
        client.producer.produce(client.topics.feedback, key=fake.key, value=fake.value)
        client.producer.flush(10)
        msgs = client.read(client.topics.channel("push"), min_count=3, timeout=60)
        titles = {m.key().decode(): orjson.loads(m.value())["content"]["title"] for m in msgs}
        assert titles == {
            "u-ok": "Picked for you: Plan for u-ok",
            "u-bad": "Our bestsellers",
            "u-forged": "Picked for you: Plan for u-forged",
        }
        assert sorted(SEEN) == ["/missing", "/recs", "/recs"]
        assert all(wire.Signer(SECRET).valid("send", m.key(), m.value(), m.headers()) for m in msgs)
        assert wait_for(lambda: w.metric("nudgeflow_journey_step_outcomes_total", step="fetch", outcome="error") == 1)
        assert wait_for(lambda: w.metric("nudgeflow_invalid_events_total", reason="bad_signature") == 1)
    finally:
        runner.terminate()
        runner.wait(20)
        w.stop()
