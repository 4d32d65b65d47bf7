"""The loop every channel-side process runs: consume a batch, handle it, flush, commit.

Senders and the call runner differ only in what they do with a batch (`handle`). Offsets are
committed after the batch's work is done and whatever it produced is flushed, so a crash replays
the batch; the durable set of finished keys (`DoneKeys`) makes the replay a no-op.
"""

from __future__ import annotations

import asyncio
import logging
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rocksdict import Options, Rdict

from nudgeflow.broker import Target
from nudgeflow.channels.clients import channel_consumer, feedback_producer, ok_messages


class DoneKeys:
    """Idempotency keys started and finished (delivered, answered, given up), in RocksDB so they
    survive restarts. Values: `i:<epoch ms>` started, `d:<epoch ms>` done. Keys older than `ttl_s`
    are forgotten by `purge` (requests that old are expired anyway: README "Send requests")."""

    def __init__(self, path: Path, ttl_s: float = 7 * 86400, clock: Callable[[], float] = time.time) -> None:
        path.mkdir(parents=True, exist_ok=True)
        self.db = Rdict(str(path), Options(raw_mode=True))
        self.ttl_s, self.clock = ttl_s, clock

    def _stamp(self, kind: bytes) -> bytes:
        return kind + b":%d" % int(self.clock() * 1000)

    def __contains__(self, key: str) -> bool:
        v = self.db.get(key.encode())
        return v is not None and (v[:1] == b"d" or v == b"1")  # b"1": written by nudgeflow 0.1

    def add(self, key: str) -> None:
        self.db.put(key.encode(), self._stamp(b"d"))

    def begin(self, key: str) -> None:
        """Mark a key as started but not finished (a crash now leaves it so: see `started`)."""
        self.db.put(key.encode(), self._stamp(b"i"))

    def started(self, key: str) -> bool:
        """Begun before and never finished: the process stopped in the middle of it."""
        v = self.db.get(key.encode())
        return v is not None and v[:1] == b"i"

    def purge(self) -> int:
        """Forget keys older than the TTL; how many."""
        horizon = int((self.clock() - self.ttl_s) * 1000)
        old = []
        for k, v in self.db.items():
            stamp = v[2:] if len(v) > 2 and v[1:2] == b":" else b""
            if stamp.isdigit() and int(stamp) < horizon:
                old.append(k)
        for k in old:
            self.db.delete(k)
        return len(old)

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
        purged_at = 0.0
        try:
            while not self._stop:
                if time.monotonic() - purged_at > 3600:  # forget keys past their TTL, hourly
                    purged_at = time.monotonic()
                    gone = await loop.run_in_executor(None, self.keys.purge)
                    if gone:
                        self.log.info("forgot %d idempotency key(s) older than %.0f s", gone, self.keys.ttl_s)
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
