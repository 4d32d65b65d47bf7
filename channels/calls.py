"""The call runner: performs the HTTP calls that journeys' `call` steps request.

Consumes `nudgeflow.calls`, calls the URL with httpx (retrying connection errors and 5xx with
backoff, within the step's timeout), and answers on `nudgeflow.feedback` with a `call_result`
keyed by user, which resumes the user's journey (success: the JSON body is saved under the step's
`save_as`; failure: the step's `on_error`). Each request key is answered once, across restarts.
Logs carry request keys and status codes only: URLs and bodies may hold personal data.
"""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path
from typing import Any

import httpx
import orjson
from tenacity import AsyncRetrying, retry_if_exception, stop_after_delay, wait_exponential

from nudgeflow.channels.clients import channel_consumer, feedback_producer, ok_messages
from nudgeflow.channels.sender import DeliveredKeys
from nudgeflow.streams.topics import Topics

log = logging.getLogger("nudgeflow.calls")


class Retryable(Exception):
    """A 5xx answer: worth another try."""


def _retryable(e: BaseException) -> bool:
    return isinstance(e, (Retryable, httpx.TransportError))


class CallRunner:
    def __init__(
        self,
        bootstrap: str,
        topics: Topics,
        group: str,
        state_dir: Path,
        session_timeout_ms: int = 10000,
        max_concurrency: int = 50,
    ) -> None:
        self.topics = topics
        self.consumer = channel_consumer(bootstrap, group, session_timeout_ms)
        self.producer = feedback_producer(bootstrap)
        self.keys = DeliveredKeys(state_dir / "call-runner")
        self.limit = asyncio.Semaphore(max_concurrency)
        self.ok = self.failed = self.duplicates = 0
        self._stop = False

    def stop(self) -> None:
        self._stop = True

    async def run(self) -> None:
        self.consumer.subscribe([self.topics.calls])
        loop = asyncio.get_running_loop()
        try:
            async with httpx.AsyncClient(follow_redirects=True) as http:
                while not self._stop:
                    msgs = await loop.run_in_executor(None, self.consumer.consume, 200, 0.5)
                    reqs = []
                    for m in ok_messages(msgs, log):
                        try:
                            reqs.append(orjson.loads(m.value()))
                        except orjson.JSONDecodeError:
                            log.warning("skipping a malformed call request at offset %s", m.offset())
                    if not reqs:
                        continue
                    await asyncio.gather(*(self._one(http, r) for r in reqs))
                    self.producer.flush(30)
                    self.consumer.commit(asynchronous=False)
        finally:
            self.consumer.close()
            self.keys.close()

    async def _one(self, http: httpx.AsyncClient, req: dict[str, Any]) -> None:
        key, user = str(req.get("key")), str(req.get("user_id"))
        if key in self.keys:
            self.duplicates += 1
            return
        async with self.limit:
            ok, body = await self._call(http, req)
        self.producer.produce(
            self.topics.feedback,
            key=user.encode(),
            value=orjson.dumps({"user_id": user, "type": "call_result", "key": key, "ok": ok, "body": body}),
        )
        self.keys.add(key)
        if ok:
            self.ok += 1
        else:
            self.failed += 1

    async def _call(self, http: httpx.AsyncClient, req: dict[str, Any]) -> tuple[bool, Any]:
        budget = max(0.5, int(req.get("timeout_ms") or 10000) / 1000 - 0.5)
        started = time.monotonic()
        try:
            async for attempt in AsyncRetrying(
                stop=stop_after_delay(budget),
                reraise=True,
                wait=wait_exponential(multiplier=0.2, max=2),
                retry=retry_if_exception(_retryable),
            ):
                with attempt:
                    left = max(0.2, budget - (time.monotonic() - started))
                    resp = await http.request(
                        req.get("method", "GET"),
                        str(req["url"]),
                        headers=req.get("headers") or {},
                        json=req.get("body"),
                        timeout=left,
                    )
                    if resp.status_code >= 500:
                        raise Retryable(str(resp.status_code))
            if resp.status_code >= 400:
                log.info("call %s answered %s", str(req.get("key"))[:12], resp.status_code)
                return False, {"status": resp.status_code}
            try:
                return True, resp.json()
            except ValueError:
                return True, {"text": resp.text[:10000]}
        except (Retryable, httpx.HTTPError) as e:
            log.info("call %s failed: %s", str(req.get("key"))[:12], type(e).__name__)
            return False, {"error": type(e).__name__}
