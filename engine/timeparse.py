"""Times as nudgeflow reads them: epoch milliseconds, or ISO-8601 text (UTC unless it says).

The one place that turns a date or a date-time into epoch ms, so the input topics, profile
dates, journey files and command-line flags all agree (a date alone means midnight UTC).
"""

from __future__ import annotations

import datetime as dt
from typing import Any


def parse_iso(text: str) -> dt.datetime | None:
    """ISO-8601 text -> an aware datetime (naive means UTC), or None when it is not ISO-8601."""
    try:
        d = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None
    return d if d.tzinfo is not None else d.replace(tzinfo=dt.UTC)


def datetime_to_ms(d: dt.datetime | dt.date) -> int:
    """A date (midnight UTC) or a datetime (naive means UTC) -> epoch ms."""
    if not isinstance(d, dt.datetime):
        d = dt.datetime(d.year, d.month, d.day)
    if d.tzinfo is None:
        d = d.replace(tzinfo=dt.UTC)
    return int(d.timestamp() * 1000)


def iso_to_ms(v: Any) -> int | None:
    """A profile date: epoch ms (a number), or ISO-8601 text; None for anything else."""
    if isinstance(v, bool):
        return None
    if isinstance(v, (int, float)):
        return int(v)
    if isinstance(v, str):
        d = parse_iso(v)
        return None if d is None else datetime_to_ms(d)
    return None


def ms_to_iso(ms: int) -> str:
    """Epoch milliseconds as ISO-8601 UTC text (milliseconds shown only when there are any)."""
    d = dt.datetime.fromtimestamp(ms / 1000, dt.UTC)
    return d.isoformat(timespec="milliseconds" if ms % 1000 else "seconds").replace("+00:00", "Z")
