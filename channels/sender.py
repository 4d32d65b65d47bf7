"""The sender: consume one channel topic in batches, deliver once per idempotency key.

At-least-once consumption plus the durable set of delivered keys gives each request one
delivery across restarts (a crash between delivery and commit replays the batch; the keys say
it was delivered). Offsets are committed only after the batch is delivered. A provider's
transient failures are retried with exponential backoff and jitter; what still fails, or is
refused for good, goes to the send dead-letter topic with the reason, never blocking the
partition. An unreachable recipient is reported on the feedback topic and the request's
fallback (another channel) is published.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from aiolimiter import AsyncLimiter
from tenacity import (
    AsyncRetrying,
    retry_if_exception_type,
    stop_after_attempt,
    stop_after_delay,
    wait_random_exponential,
)

from nudgeflow.broker import Target
from nudgeflow.channels import metrics
from nudgeflow.channels.clients import run_until_signalled
from nudgeflow.channels.consumer import BatchConsumer
from nudgeflow.channels.providers import Permanent, Provider, Transient, Unreachable
from nudgeflow.engine.io import Feedback, SendRequest
from nudgeflow.streams import wire
from nudgeflow.streams.topics import Topics

log = logging.getLogger("nudgeflow.sender")


class Sender(BatchConsumer):
    def __init__(
        self,
        bootstrap: Target,
        channel: str,
        provider: Provider,
        topics: Topics,
        group: str,
        state_dir: Path,
        session_timeout_ms: int = 10000,
        max_attempts: int = 5,
        retry_max_s: float = 60.0,
        signer: wire.Signer = wire.UNSIGNED,
        rate_per_s: float | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        topic = topics.channel(channel)
        super().__init__(
            bootstrap,
            topic,
            group,
            state_dir / f"sender-{channel}",
            session_timeout_ms,
            log,
            keys_topic=topics.keys(f"send.{channel}"),
        )
        self.channel, self.provider, self.topics = channel, provider, topics
        self.max_attempts, self.retry_max_s, self.signer = max_attempts, retry_max_s, signer
        self.delivered = self.duplicates = self.unreachable = self.invalid = self.dead = self.retries = 0
        self.forged = self.expired = 0
        # the provider's rate limit, across batches and retries (a leaky bucket: bursts of one second)
        self.limiter = AsyncLimiter(rate_per_s, 1) if rate_per_s else None
        self.clock = clock

    async def handle(self, msgs: list[Any]) -> None:
        ready: list[tuple[Any, SendRequest]] = []
        seen: set[str] = set()  # a key twice in one batch: the second is a duplicate too
        for m in msgs:
            req = self._admit(m, seen)
            if req is not None:
                ready.append((m, req))
                seen.add(req.key)
        for m, req in ready:
            self.keys.begin(req.key, m.partition())
        if ready and self.keys.journal is not None:
            self.producer.flush(30)  # the started marks are durable before anything is handed over
        for m, req in ready:
            await self._one(m, req)
            self.keys.add(req.key, m.partition())

    def _admit(self, m: Any, seen: set[str]) -> SendRequest | None:
        """The request to deliver, or None when it is forged, malformed, done, expired or interrupted."""
        if not self.signer.valid("send", m.key(), m.value(), m.headers()):
            self.forged += 1
            metrics.FORGED.labels(self.topic).inc()
            log.warning("a send request without a valid signature at offset %s is dead-lettered", m.offset())
            self._dead(m, "bad_signature", "no valid signature (NUDGEFLOW_TOPIC_SECRET)")
            return None
        try:
            req = wire.decode_send_request(m.value())
        except wire.WireError as e:
            self.invalid += 1
            log.warning("a malformed send request at offset %s goes to the dead-letter topic", m.offset())
            self._dead(m, "malformed", str(e))
            return None
        if req.key in self.keys or req.key in seen:
            self.duplicates += 1
            self._count("duplicate")
            return None
        if req.expires_at is not None and self.clock() * 1000 > req.expires_at:
            self.expired += 1  # a cart push two days late does more harm than none
            self._count("expired")
            self.keys.add(req.key, m.partition())
            return None
        if self.keys.started(req.key) and not self.provider.idempotent:
            # a crash between handing it to the provider and recording it: it may have gone out;
            # a provider without idempotency keys would send it twice, so it is set aside
            self.dead += 1
            self._count("dead_lettered")
            log.warning("send %s was interrupted by a restart: dead-lettered, not repeated", req.key[:12])
            self._dead(m, "interrupted", "the sender stopped while delivering it; the provider may have it")
            self.keys.add(req.key, m.partition())
            return None
        return req

    async def _one(self, m: Any, req: SendRequest) -> None:
        try:
            await self._deliver(req)
            self.delivered += 1
            self._count("delivered")
            self._produce(self.topics.feedback, wire.encode_feedback(self._feedback(req, "delivered"), self.signer))
        except Unreachable as e:
            self.unreachable += 1
            self._count("unreachable")
            log.info("user %s unreachable on %s (%s)", req.user_id, self.channel, e.reason)
            self._produce(self.topics.feedback, wire.encode_feedback(self._feedback(req, "unreachable"), self.signer))
            if req.fallback:
                self._produce(
                    self.topics.channel(req.fallback.channel), wire.encode_send_request(req.fallback, self.signer)
                )
        except (Permanent, Transient) as e:
            self.dead += 1
            self._count("dead_lettered")
            log.warning("send %s for user %s dead-lettered: %s", req.key[:12], req.user_id, e.reason)
            self._dead(m, "permanent" if isinstance(e, Permanent) else "retries_exhausted", e.reason)
            self._produce(self.topics.feedback, wire.encode_feedback(self._feedback(req, "failed"), self.signer))

    async def _deliver(self, req: SendRequest) -> None:
        async for attempt in AsyncRetrying(
            stop=stop_after_attempt(self.max_attempts) | stop_after_delay(self.retry_max_s),
            wait=wait_random_exponential(multiplier=0.5, max=30),
            retry=retry_if_exception_type(Transient),
            reraise=True,
        ):
            with attempt:
                if attempt.retry_state.attempt_number > 1:
                    self.retries += 1
                    metrics.RETRIES.labels(self.channel).inc()
                t0 = time.monotonic()
                if self.limiter is not None:
                    async with self.limiter:
                        await self.provider.deliver(req)
                else:
                    await self.provider.deliver(req)
                metrics.PROVIDER_SECONDS.labels(self.channel, self.provider.name).observe(time.monotonic() - t0)
                metrics.REQUEST_AGE.labels(self.channel).observe(max(0.0, self.clock() - req.created_at / 1000))

    def _feedback(self, req: SendRequest, status: str) -> Feedback:
        return Feedback(req.user_id, self.channel, status, req.key, req.journey, req.step)

    def _count(self, result: str) -> None:
        metrics.DELIVERIES.labels(self.channel, self.provider.name, result).inc()

    def _dead(self, m: Any, reason: str, detail: str) -> None:
        metrics.DEAD_LETTERS.labels(self.channel, reason).inc()
        headers = [("reason", reason.encode()), ("detail", detail.encode()), ("channel", self.channel.encode())]
        headers += [(f"original.{k}", v) for k, v in (m.headers() or [])]
        self.producer.produce(self.topics.send_dead_letter, key=m.key(), value=m.value(), headers=headers)

    def _produce(self, topic: str, enc: wire.Encoded) -> None:
        self.producer.produce(topic, key=enc.key, value=enc.value, headers=enc.headers)

    async def close(self) -> None:
        await self.provider.close()


def run_sender(sender: Sender) -> None:
    run_until_signalled(sender.run, sender.stop)
