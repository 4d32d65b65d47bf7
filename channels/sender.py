"""The sender: consume one channel topic in batches, deliver once per idempotency key.

At-least-once consumption plus the durable set of delivered keys gives each request one
delivery across restarts (a crash between delivery and commit replays the batch; the keys say
it was delivered). Offsets are committed only after the batch is delivered.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from nudgeflow.channels.clients import run_until_signalled
from nudgeflow.channels.consumer import BatchConsumer
from nudgeflow.channels.providers import Provider, Unreachable
from nudgeflow.engine.io import Feedback
from nudgeflow.streams import wire
from nudgeflow.streams.topics import Topics

log = logging.getLogger("nudgeflow.sender")


class Sender(BatchConsumer):
    def __init__(
        self,
        bootstrap: str,
        channel: str,
        provider: Provider,
        topics: Topics,
        group: str,
        state_dir: Path,
        session_timeout_ms: int = 10000,
    ) -> None:
        topic = topics.channel(channel)
        super().__init__(bootstrap, topic, group, state_dir / f"sender-{channel}", session_timeout_ms, log)
        self.channel, self.provider, self.topics = channel, provider, topics
        self.delivered = self.duplicates = self.unreachable = self.invalid = 0

    async def handle(self, msgs: list[Any]) -> None:
        for m in msgs:
            try:
                req = wire.decode_send_request(m.value())
            except wire.WireError:
                self.invalid += 1
                log.warning("skipping a malformed send request at offset %s", m.offset())
                continue
            if req.key in self.keys:
                self.duplicates += 1
                continue
            try:
                await self.provider.deliver(req)
                self.delivered += 1
            except Unreachable:
                self.unreachable += 1
                self._produce(
                    self.topics.feedback, wire.encode_feedback(Feedback(req.user_id, self.channel, "unreachable"))
                )
                if req.fallback:
                    self._produce(self.topics.channel(req.fallback.channel), wire.encode_send_request(req.fallback))
            self.keys.add(req.key)

    def _produce(self, topic: str, enc: wire.Encoded) -> None:
        self.producer.produce(topic, key=enc.key, value=enc.value, headers=enc.headers)

    async def close(self) -> None:
        await self.provider.close()


def run_sender(sender: Sender) -> None:
    run_until_signalled(sender.run, sender.stop)
