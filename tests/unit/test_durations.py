import pytest

from nudgeflow.engine.durations import format_duration, parse_duration
from nudgeflow.engine.errors import DurationError


@pytest.mark.parametrize(
    ("text", "ms"),
    [
        ("30m", 1_800_000),
        ("1d", 86_400_000),
        ("2h30m", 9_000_000),
        ("500ms", 500),
        ("1w", 604_800_000),
        ("3mo", 3 * 30 * 86_400_000),
        ("1y", 365 * 86_400_000),
        ("10s", 10_000),
    ],
)
def test_parses_units(text: str, ms: int) -> None:
    assert parse_duration(text) == ms


def test_negative_only_where_allowed() -> None:
    assert parse_duration("-10d", allow_negative=True) == -10 * 86_400_000
    with pytest.raises(DurationError, match="negative"):
        parse_duration("-10d")


@pytest.mark.parametrize("bad", ["30", "30x", "", "m", "1.5h", "0m", 30, True, None])
def test_rejects_with_a_hint(bad: object) -> None:
    with pytest.raises(DurationError):
        parse_duration(bad)


def test_format_roundtrip() -> None:
    for ms in (1, 999, 60_000, 9_000_000, 86_400_000 + 1):
        assert parse_duration(format_duration(ms)) == ms
