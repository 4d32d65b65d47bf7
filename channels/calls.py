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
from tenacity import AsyncRetrying, retry_if_exception, stop_after_delay, wait_exponential

from nudgeflow.channels.consumer import BatchConsumer
from nudgeflow.engine.errors import NudgeflowError
from nudgeflow.engine.io import CallRequest, CallResult
from nudgeflow.streams import wire
from nudgeflow.streams.topics import Topics

log = logging.getLogger("nudgeflow.calls")


class Retryable(NudgeflowError):
    """A 5xx answer: worth another try."""


def _retryable(e: BaseException) -> bool:
    return isinstance(e, (Retryable, httpx.TransportError))


class CallRunner(BatchConsumer):
    batch_max = 200

    def __init__(
        self,
        bootstrap: str,
        topics: Topics,
        group: str,
        state_dir: Path,
        session_timeout_ms: int = 10000,
        max_concurrency: int = 50,
    ) -> None:
        super().__init__(bootstrap, topics.calls, group, state_dir / "call-runner", session_timeout_ms, log)
        self.topics = topics
        self.limit = asyncio.Semaphore(max_concurrency)
        self.ok = self.failed = self.duplicates = 0
        self._http: httpx.AsyncClient | None = None

    async def handle(self, msgs: list[Any]) -> None:
        reqs = []
        for m in msgs:
            try:
                reqs.append(wire.decode_call_request(m.value()))
            except wire.WireError:
                log.warning("skipping a malformed call request at offset %s", m.offset())
        if self._http is None:
            self._http = httpx.AsyncClient(follow_redirects=True)
        http = self._http
        await asyncio.gather(*(self._one(http, r) for r in reqs))

    async def close(self) -> None:
        if self._http is not None:
            await self._http.aclose()

    async def _one(self, http: httpx.AsyncClient, req: CallRequest) -> None:
        if req.key in self.keys:
            self.duplicates += 1
            return
        async with self.limit:
            ok, body = await self._call(http, req)
        enc = wire.encode_call_result(CallResult(req.user_id, req.key, ok, body))
        self.producer.produce(self.topics.feedback, key=enc.key, value=enc.value)
        self.keys.add(req.key)
        if ok:
            self.ok += 1
        else:
            self.failed += 1

    async def _call(self, http: httpx.AsyncClient, req: CallRequest) -> tuple[bool, Any]:
        budget = max(0.5, (req.timeout_ms or 10000) / 1000 - 0.5)
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
                        req.method or "GET",
                        req.url,
                        headers=dict(req.headers or {}),
                        json=req.body,
                        timeout=left,
                    )
                    if resp.status_code >= 500:
                        raise Retryable(str(resp.status_code))
            if resp.status_code >= 400:
                log.info("call %s answered %s", req.key[:12], resp.status_code)
                return False, {"status": resp.status_code}
            try:
                return True, resp.json()
            except ValueError:
                return True, {"text": resp.text[:10000]}
        except (Retryable, httpx.HTTPError) as e:
            log.info("call %s failed: %s", req.key[:12], type(e).__name__)
            return False, {"error": type(e).__name__}
