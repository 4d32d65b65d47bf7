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


class FullOnce:
    """A producer whose local queue is full once, at the second record."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, bytes | None, bytes | None, int]] = []
        self.polls = 0

    def produce(self, topic: str, value: bytes | None, key: bytes | None, partition: int, **kw: object) -> None:
        if len(self.sent) == 1 and self.polls == 0:
            raise BufferError("Local: Queue full")
        self.sent.append((topic, value, key, partition))

    def poll(self, timeout: float) -> int:
        self.polls += 1
        return 0


def test_produce_many_waits_for_room_and_keeps_the_order() -> None:
    out = Output({"bootstrap.servers": "127.0.0.1:1"}, track_topic="cl")
    out.producer = FullOnce()  # type: ignore[assignment]
    out.produce_many("cl", [(b"a", b"1"), (b"b", b"2"), (b"c", None)], 3)
    assert out.producer.sent == [("cl", b"1", b"a", 3), ("cl", b"2", b"b", 3), ("cl", None, b"c", 3)]  # type: ignore[attr-defined]
    assert out.producer.polls == 1  # type: ignore[attr-defined]
