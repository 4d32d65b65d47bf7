"""Durations as marketers write them ("30m", "1d", "2h30m", "3mo") to milliseconds."""

from __future__ import annotations

import re

from nudgeflow.engine.errors import DurationError

MS = {
    "ms": 1,
    "s": 1_000,
    "m": 60_000,
    "h": 3_600_000,
    "d": 86_400_000,
    "w": 7 * 86_400_000,
    "mo": 30 * 86_400_000,  # a month is 30 days: waits must be exact and reproducible
    "y": 365 * 86_400_000,
}
_PART = re.compile(r"(\d+)\s*(ms|mo|s|m|h|d|w|y)")
_WHOLE = re.compile(r"^\s*-?\s*(?:\d+\s*(?:ms|mo|s|m|h|d|w|y)\s*)+$")
HELP = "use a number and a unit: ms, s, m, h, d, w, mo (30 days), y (365 days); e.g. 30m, 2h30m, 10d"


def parse_duration(text: object, allow_negative: bool = False) -> int:
    """Milliseconds of a duration like "30m", "1d", "-10d" (negative only where allowed)."""
    if isinstance(text, bool) or not isinstance(text, (str, int)):
        raise DurationError(f"a duration must be text like '30m', not {text!r}")
    if isinstance(text, int):
        raise DurationError(f"the duration {text} has no unit; {HELP}")
    if not _WHOLE.match(text):
        raise DurationError(f"'{text}' is not a duration; {HELP}")
    total = sum(int(n) * MS[u] for n, u in _PART.findall(text))
    negative = text.strip().startswith("-")
    if negative and not allow_negative:
        raise DurationError(f"'{text}' is negative; a wait must be positive")
    if total == 0 and not negative:
        raise DurationError(f"'{text}' is zero; {HELP}")
    return -total if negative else total


def format_duration(ms: int) -> str:
    """The shortest exact text for a duration in milliseconds (inverse of parse_duration)."""
    if ms == 0:
        return "0s"
    sign, ms, out = ("-" if ms < 0 else ""), abs(ms), []
    for unit in ("d", "h", "m", "s", "ms"):
        n, ms = divmod(ms, MS[unit])
        if n:
            out.append(f"{n}{unit}")
    return sign + "".join(out)
