"""A batch whose records cannot be written is held and produced again, never acknowledged half-done."""

from __future__ import annotations

import asyncio

from nudgeflow.agents.output import DeliveryError, Output


class Flaky(Output):
    def __init__(self, failures: int) -> None:
        super().__init__({"bootstrap.servers": "127.0.0.1:1"})  # never contacted: flush is replaced
        self.failures, self.flushes = failures, 0

    async def flush(self, timeout: float = 30.0) -> None:
        self.flushes += 1
        if self.flushes <= self.failures:
            raise DeliveryError("1 record(s) not delivered: MSG_SIZE_TOO_LARGE")


def test_a_failed_delivery_is_retried_with_backoff_until_the_whole_batch_is_written() -> None:
    out, produced, failures = Flaky(failures=2), [], []
    attempts = asyncio.run(
        out.deliver(lambda: produced.append("batch"), lambda e, d: failures.append((str(e), d)), first_delay=0.01)
    )
    assert attempts == 3 and produced == ["batch"] * 3
    assert [d for _, d in failures] == [0.01, 0.02] and "MSG_SIZE_TOO_LARGE" in failures[0][0]
