"""Local HTTP servers that speak an API's shape, for the tests: a handler base that answers JSON
quietly, and a way to serve one on a free loopback port."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


class ApiHandler(BaseHTTPRequestHandler):
    def answer(self, status: int, doc: Any = None, headers: Iterable[tuple[str, str]] = ()) -> None:
        """A JSON answer (`doc`), or an empty one (None), with extra headers."""
        data = json.dumps(doc).encode() if doc is not None else b""
        self.send_response(status)
        if doc is not None:
            self.send_header("Content-Type", "application/json")
        for k, v in headers:
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: object) -> None:
        return


def start(handler: type[BaseHTTPRequestHandler]) -> tuple[str, Callable[[], None]]:
    """Serve `handler` on 127.0.0.1 from a thread: its base URL, and how to stop it."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return f"http://127.0.0.1:{server.server_address[1]}", server.shutdown
