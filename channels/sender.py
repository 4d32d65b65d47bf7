"""The sender loop: consume a channel topic in batches, deliver once per idempotency key.

At-least-once consumption plus a persistent set of delivered keys gives each request one
delivery across restarts (a crash between delivery and commit replays the batch; the keys say
it was delivered). Offsets are committed only after the batch is delivered.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import orjson
from pydantic import ValidationError
from rocksdict import Options, Rdict

from nudgeflow.channels.clients import channel_consumer, feedback_producer, ok_messages, run_until_signalled
from nudgeflow.channels.providers import Provider, Unreachable
from nudgeflow.channels.requests import parse_send_request
from nudgeflow.streams.topics import Topics

log = logging.getLogger("nudgeflow.sender")


class DeliveredKeys:
    """Idempotency keys already delivered, in RocksDB so they survive restarts."""

    def __init__(self, path: Path) -> None:
        path.mkdir(parents=True, exist_ok=True)
        self.db = Rdict(str(path), Options(raw_mode=True))

    def __contains__(self, key: str) -> bool:
        return self.db.get(key.encode()) is not None

    def add(self, key: str) -> None:
        self.db.put(key.encode(), b"1")

    def close(self) -> None:
        self.db.close()


class Sender:
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
        self.channel, self.provider, self.topics = channel, provider, topics
        self.consumer = channel_consumer(bootstrap, group, session_timeout_ms)
        self.producer = feedback_producer(bootstrap)
        self.keys = DeliveredKeys(state_dir / f"sender-{channel}")
        self.delivered = self.duplicates = self.unreachable = self.invalid = 0
        self._stop = False

    def stop(self) -> None:
        self._stop = True

    async def run(self, idle_exit_s: float | None = None) -> None:
        self.consumer.subscribe([self.topics.channel(self.channel)])
        loop = asyncio.get_running_loop()
        idle = 0.0
        try:
            while not self._stop:
                msgs = await loop.run_in_executor(None, self.consumer.consume, 500, 0.5)
                if not msgs:
                    idle += 0.5
                    if idle_exit_s is not None and idle >= idle_exit_s:
                        return
                    continue
                idle = 0.0
                await self._batch(msgs)
                self.producer.flush(30)
                self.consumer.commit(asynchronous=False)
        finally:
            self.consumer.close()
            self.keys.close()
            await self.provider.close()

    async def _batch(self, msgs: list) -> None:  # type: ignore[type-arg]
        for m in ok_messages(msgs, log):
            try:
                req = parse_send_request(orjson.loads(m.value()))
            except (orjson.JSONDecodeError, ValidationError):
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
                self._feedback(req.user_id, "unreachable")
                if req.fallback:
                    fb = req.fallback
                    self.producer.produce(
                        self.topics.channel(fb.channel), key=fb.user_id.encode(), value=orjson.dumps(fb.to_dict())
                    )
            self.keys.add(req.key)

    def _feedback(self, user: str, status: str) -> None:
        self.producer.produce(
            self.topics.feedback,
            key=user.encode(),
            value=orjson.dumps({"user_id": user, "type": "feedback", "channel": self.channel, "status": status}),
        )


def run_sender(sender: Sender) -> None:
    run_until_signalled(sender.run, sender.stop)
