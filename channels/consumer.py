"""The loop every channel-side process runs: consume a batch, handle it, flush, commit.

Senders and the call runner differ only in what they do with a batch (`handle`). Offsets are
committed after the batch's work is done and whatever it produced is flushed, so a crash replays
the batch; the durable set of finished keys (`DoneKeys`) makes the replay a no-op.
"""

from __future__ import annotations

import asyncio
import logging
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

from rocksdict import Options, Rdict

from nudgeflow.broker import Target
from nudgeflow.channels.clients import channel_consumer, feedback_producer, ok_messages


class DoneKeys:
    """Idempotency keys already delivered or answered, in RocksDB so they survive restarts."""

    def __init__(self, path: Path) -> None:
        path.mkdir(parents=True, exist_ok=True)
        self.db = Rdict(str(path), Options(raw_mode=True))

    def __contains__(self, key: str) -> bool:
        return self.db.get(key.encode()) == b"1"

    def add(self, key: str) -> None:
        self.db.put(key.encode(), b"1")

    def begin(self, key: str) -> None:
        """Mark a key as started but not finished (a crash now leaves it so: see `started`)."""
        self.db.put(key.encode(), b"i")

    def started(self, key: str) -> bool:
        """Begun before and never finished: the process stopped in the middle of it."""
        return self.db.get(key.encode()) == b"i"

    def close(self) -> None:
        self.db.close()


class BatchConsumer(ABC):
    batch_max = 500

    def __init__(
        self, bootstrap: Target, topic: str, group: str, keys_dir: Path, session_timeout_ms: int, log: logging.Logger
    ) -> None:
        self.topic, self.log = topic, log
        self.consumer = channel_consumer(bootstrap, group, session_timeout_ms)
        self.producer = feedback_producer(bootstrap)
        self.keys = DoneKeys(keys_dir)
        self._stop = False

    def stop(self) -> None:
        """Stop after the current batch (signal handlers call this)."""
        self._stop = True

    @abstractmethod
    async def handle(self, msgs: list[Any]) -> None:
        """Do the work of one batch of (error-free) messages."""

    async def close(self) -> None:  # noqa: B027 - optional hook, most subclasses hold something
        """Release what the subclass holds (providers, clients)."""

    async def run(self, idle_exit_s: float | None = None) -> None:
        self.consumer.subscribe([self.topic])
        loop = asyncio.get_running_loop()
        idle = 0.0
        try:
            while not self._stop:
                msgs = await loop.run_in_executor(None, self.consumer.consume, self.batch_max, 0.5)
                if not msgs:
                    idle += 0.5
                    if idle_exit_s is not None and idle >= idle_exit_s:
                        return
                    continue
                idle = 0.0
                ok = list(ok_messages(msgs, self.log))
                if not ok:
                    continue
                await self.handle(ok)
                self.producer.flush(30)
                self.consumer.commit(asynchronous=False)
        finally:
            self.consumer.close()
            self.keys.close()
            await self.close()
