"""The worker's HTTP endpoints: `/metrics`, `/healthz` and `/readyz` on one port.

prometheus_client's own server answers 200 with the metrics on every path, so a probe on it says
nothing. Here:

- `/healthz` (liveness) is 200 while the processing loop keeps turning: it beats at every batch
  and every idle second, and a restore beats after every chunk it reads. A loop that has not
  beaten for `stale_s`, or one that ended without being asked to stop, answers 503 and the
  orchestrator restarts the process. Before the loop exists (journeys loading, topics being
  created) the process is alive.
- `/readyz` (readiness) is 200 once partitions are assigned and restored and the loop runs, 503
  during start, restores and rebalances.

The bodies are one short line of text (ids and counts only).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Protocol
from wsgiref.simple_server import WSGIRequestHandler, make_server

from prometheus_client import make_wsgi_app
from prometheus_client.exposition import ThreadingWSGIServer


class Loop(Protocol):
    ready: bool
    beat: float
    ended: bool
    partitions: list[int]


@dataclass
class Health:
    loop: Loop | None = None
    stale_s: float = 60.0

    def live(self) -> tuple[bool, str]:
        loop = self.loop
        if loop is None:
            return True, "starting"
        if loop.ended:
            return False, "the processing loop ended"
        age = time.monotonic() - loop.beat
        if age > self.stale_s:
            return False, f"the processing loop has not turned for {age:.0f} s"
        return True, "ok"

    def ready(self) -> tuple[bool, str]:
        loop = self.loop
        if loop is None:
            return False, "starting"
        if not loop.ready:
            return False, "partitions not assigned or not restored yet"
        return True, f"ok: partitions {loop.partitions}"


HEALTH = Health()


class _Quiet(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        return


def wsgi_app(health: Health) -> Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]:
    metrics = make_wsgi_app()

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "/")
        if path in ("/healthz", "/readyz"):
            ok, why = health.live() if path == "/healthz" else health.ready()
            start_response("200 OK" if ok else "503 Service Unavailable", [("Content-Type", "text/plain")])
            return [why.encode() + b"\n"]
        if path in ("/metrics", "/"):
            result: Iterable[bytes] = metrics(environ, start_response)
            return result
        start_response("404 Not Found", [("Content-Type", "text/plain")])
        return [b"/metrics, /healthz or /readyz\n"]

    return app


def serve(host: str, port: int, health: Health = HEALTH) -> int:
    """Serve the endpoints from a daemon thread; the port bound (`port` 0: a free one)."""
    server = make_server(host, port, wsgi_app(health), ThreadingWSGIServer, handler_class=_Quiet)
    threading.Thread(target=server.serve_forever, name="nudgeflow-http", daemon=True).start()
    bound: int = server.server_address[1]
    return bound
