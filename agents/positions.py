"""Where each input partition stands: read position, high watermark, newest applied event time.

The worker holds timers back while an input lags (see `agents.timers.event_time_gate`), so it
must know, per (topic, partition), whether everything up to the high watermark has been read and
how far event time has got. High watermarks come from fetch answers (Faust's consumer keeps
them), never from ListOffsets, which Tansu answers with the last batch's base offset + 1.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from faust.types import TP

from nudgeflow.agents.align import Aligner


class InputPositions:
    def __init__(self, app: Any, topics: list[str], aligner: Aligner[Any]) -> None:
        self.app, self.topics, self.aligner = app, topics, aligner  # app.consumer exists once started
        self.newest: dict[tuple[str, int], int] = {}  # (topic, p) -> newest event time applied
        self._idle: dict[tuple[str, int], int | None] = {}  # fetch positions of idle inputs

    def applied(self, max_ts: Mapping[tuple[str, int], int]) -> None:
        for tp, ts in max_ts.items():
            self.newest[tp] = max(self.newest.get(tp, ts), ts)

    def forget(self, partitions: set[int]) -> None:
        """Partitions revoked: their positions belong to their new owner."""
        self._idle.clear()
        for key in [k for k in self.newest if k[1] in partitions]:
            del self.newest[key]

    async def _position(self, topic: str, partition: int) -> int | None:
        read = self.aligner.read_upto.get((topic, partition))
        if read is not None:
            return read
        if (topic, partition) in self._idle:  # nothing delivered since: still the same
            return self._idle[(topic, partition)]
        try:
            pos: int | None = await self.app.consumer.position(TP(topic, partition))
        except Exception:  # not assigned (any more)
            return None
        self._idle[(topic, partition)] = pos
        return pos

    async def lagging(self, partitions: Iterable[int]) -> dict[tuple[str, int], bool]:
        """(topic, partition) -> whether offsets are left to read (per the fetch high watermark).
        Unknown (just assigned, no fetch answer yet) counts as lagging: hold rather than guess."""
        out = {}
        for p in partitions:
            for topic in self.topics:
                try:
                    highwater = self.app.consumer.highwater(TP(topic, p))
                except Exception:
                    highwater = None
                position = await self._position(topic, p)
                out[(topic, p)] = highwater is None or position is None or position < highwater
        return out
