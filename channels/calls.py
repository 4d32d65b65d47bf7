"""The call runner: performs the HTTP calls that journeys' `call` steps request.

Consumes `nudgeflow.calls`, calls the URL through the outbound policy (`channels.outbound`: allowed
hosts, public addresses only, checked redirects, a capped answer), retrying connection errors and
5xx with backoff within the step's timeout, and answers on `nudgeflow.feedback` with a
`call_result` keyed by user, which resumes the user's journey (success: the JSON body, or
`{"text": ...}` for a text answer, is saved under the step's `save_as`; failure: the step's
`on_error`). Each call carries an `Idempotency-Key` header (the request key).

Each request key is answered once, across restarts: a key is marked *started* in RocksDB before the
call and *answered* after its result is produced. A key found started after a restart was
interrupted mid-call: a GET is made again (it changes nothing), a POST is not (the API may have
acted on it) and is answered as failed (`interrupted`), taking the step's `on_error`.

With a topic secret, call requests must carry a valid signature (others are dead-lettered and
counted) and results are signed. Logs carry request keys, reasons and status codes only: URLs and
bodies may hold personal data.
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

from nudgeflow.broker import Target
from nudgeflow.channels import metrics
from nudgeflow.channels.consumer import BatchConsumer
from nudgeflow.channels.outbound import Outbound, OutboundPolicy, Refused
from nudgeflow.engine.errors import NudgeflowError
from nudgeflow.engine.io import CallRequest, CallResult
from nudgeflow.streams import wire
from nudgeflow.streams.topics import Topics

log = logging.getLogger("nudgeflow.calls")


class Retryable(NudgeflowError):
    """A 5xx answer: worth another try."""


def _retryable(e: BaseException) -> bool:
    return isinstance(e, (Retryable, httpx.TransportError))


def answer_body(content_type: str, body: bytes) -> tuple[bool, Any]:
    """(ok, what is saved) for a 2xx answer: JSON as parsed, text as {"text": ...}, nothing else."""
    ctype = content_type.split(";", 1)[0].strip().lower()
    if not body:
        return True, {}
    if ctype == "application/json" or ctype.endswith("+json"):
        try:
            return True, orjson.loads(body)
        except orjson.JSONDecodeError:
            return False, {"error": "bad_json"}
    if ctype.startswith("text/"):
        return True, {"text": body.decode("utf-8", "replace")}
    return False, {"error": "content_type"}


async def perform_call(http: Outbound, req: CallRequest) -> tuple[bool, Any]:
    """One `call` step's request within its timeout (connection errors and 5xx retried): (ok, the
    answer to save or why it failed). The call runner's, and `simulate --calls live`."""
    budget = max(0.5, (req.timeout_ms or 10000) / 1000 - 0.5)
    started = time.monotonic()
    headers = {**dict(req.headers or {}), "idempotency-key": req.key}
    try:
        async for attempt in AsyncRetrying(
            stop=stop_after_delay(budget),
            reraise=True,
            wait=wait_exponential(multiplier=0.2, max=2),
            retry=retry_if_exception(_retryable),
        ):
            with attempt:
                left = max(0.2, budget - (time.monotonic() - started))
                ans = await http.request(req.method or "GET", req.url, headers=headers, json=req.body, timeout=left)
                if ans.status >= 500:
                    raise Retryable(str(ans.status))
        if ans.status >= 400:
            log.info("call %s answered %s", req.key[:12], ans.status)
            return False, {"status": ans.status}
        if ans.status >= 300:
            return False, {"error": "redirect"}
        return answer_body(ans.content_type, ans.body)
    except Refused as e:
        log.info("call %s refused: %s", req.key[:12], e.reason)
        return False, {"error": e.reason}
    except (Retryable, httpx.HTTPError) as e:
        log.info("call %s failed: %s", req.key[:12], type(e).__name__)
        return False, {"error": type(e).__name__}


class CallRunner(BatchConsumer):
    batch_max = 200

    def __init__(
        self,
        bootstrap: Target,
        topics: Topics,
        group: str,
        state_dir: Path,
        session_timeout_ms: int = 10000,
        max_concurrency: int = 50,
        policy: OutboundPolicy | None = None,
        max_response_bytes: int = 32 * 1024,
        signer: wire.Signer = wire.UNSIGNED,
    ) -> None:
        super().__init__(
            bootstrap,
            topics.calls,
            group,
            state_dir / "call-runner",
            session_timeout_ms,
            log,
            keys_topic=topics.keys("calls"),
        )
        self.topics, self.signer = topics, signer
        self.limit = asyncio.Semaphore(max_concurrency)
        self.ok = self.failed = self.duplicates = self.forged = 0
        self.policy = policy or OutboundPolicy()
        self.max_response_bytes = max_response_bytes
        self._http: Outbound | None = None

    async def handle(self, msgs: list[Any]) -> None:
        reqs = []
        for m in msgs:
            if not self.signer.valid("call", m.key(), m.value(), m.headers()):
                self.forged += 1
                metrics.FORGED.labels(self.topics.calls).inc()
                log.warning("a call request without a valid signature at offset %s is dead-lettered", m.offset())
                self._dead(m, "bad_signature", "call request without a valid signature (NUDGEFLOW_TOPIC_SECRET)")
                continue
            try:
                reqs.append((m.partition(), wire.decode_call_request(m.value())))
            except wire.WireError as e:
                log.warning("a malformed call request at offset %s is dead-lettered", m.offset())
                self._dead(m, "bad_message", str(e))
        if self._http is None:
            self._http = Outbound(self.policy, self.max_response_bytes)
        http = self._http
        todo, seen = [], set()
        for p, r in reqs:
            if r.key in self.keys or r.key in seen:
                self.duplicates += 1
                continue
            seen.add(r.key)
            interrupted = self.keys.started(r.key) and (r.method or "GET") != "GET"
            if not interrupted:
                self.keys.begin(r.key, p)
            todo.append((p, r, interrupted))
        if todo and self.keys.journal is not None:
            self.producer.flush(30)  # the started marks are durable before any call is made
        await asyncio.gather(*(self._one(http, p, r, interrupted) for p, r, interrupted in todo))

    def _dead(self, m: Any, reason: str, detail: str) -> None:
        headers = wire.dead_letter_headers(reason, detail, m.topic(), m.partition(), m.offset())
        self.producer.produce(self.topics.dead_letter, key=m.key(), value=m.value(), headers=headers)

    async def close(self) -> None:
        if self._http is not None:
            await self._http.aclose()

    async def _one(self, http: Outbound, partition: int, req: CallRequest, interrupted: bool) -> None:
        if interrupted:
            ok, body = False, {"error": "interrupted"}  # the API may have acted on it: never twice
            log.info("call %s was interrupted by a restart: not repeated", req.key[:12])
        else:
            async with self.limit:
                ok, body = await perform_call(http, req)
        enc = wire.encode_call_result(CallResult(req.user_id, req.key, ok, body), self.signer)
        self.producer.produce(self.topics.feedback, key=enc.key, value=enc.value, headers=enc.headers)
        self.keys.add(req.key, partition)
        metrics.CALLS.labels("ok" if ok else "failed").inc()
        if ok:
            self.ok += 1
        else:
            self.failed += 1
