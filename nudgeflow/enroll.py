"""`nudgeflow enroll`: a one-off list of users (CSV) into a journey with `entry: {enrolled: true}`.

The CSV needs a `user_id` column; the other columns become the entry's trigger properties (so
messages can use `{{ trigger.first_name }}`). Each row becomes a `nudgeflow.enroll` event on
custom_events, keyed by user id with the inputs' partitioner. The event id is derived from the
journey, the file's name and the user, so enrolling the same file twice is visible in analytics
and a journey with `eligibility: once` ignores the repeat.
"""

from __future__ import annotations

import csv
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import orjson

from nudgeflow.broker import Target, client_conf
from nudgeflow.engine.errors import NudgeflowError
from nudgeflow.streams.events import ENROLL_EVENT, RELEASE_EVENT


class EnrollFileError(NudgeflowError):
    """The CSV cannot be used: no user_id column, or an empty user id on a line."""


def enroll_events(path: Path, journey: str, now_ms: int | None = None) -> Iterator[tuple[str, dict[str, Any]]]:
    ts = now_ms if now_ms is not None else int(time.time() * 1000)
    with path.open(newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        if not reader.fieldnames or "user_id" not in reader.fieldnames:
            raise EnrollFileError(f"{path}: the first line must name the columns, one of them user_id")
        for line, row in enumerate(reader, start=2):
            user = (row.pop("user_id") or "").strip()
            if not user:
                raise EnrollFileError(f"{path}:{line}: empty user_id")
            props = {k: v for k, v in row.items() if k} | {"journey": journey}
            yield (
                user,
                {
                    "user_id": user,
                    "event": ENROLL_EVENT,
                    "ts": ts,
                    "props": props,
                    "event_id": f"enroll:{journey}:{path.name}:{user}",
                },
            )


def produce_enrollments(bootstrap: Target, topic: str, path: Path, journey: str) -> int:
    return produce_user_events(bootstrap, topic, enroll_events(path, journey))


def release_events(users: Iterable[str], ts: int) -> Iterator[tuple[str, dict[str, Any]]]:
    """`nudgeflow release`: lift the quarantine of these users (README "Quarantine")."""
    for user in users:
        yield user, {"user_id": user, "event": RELEASE_EVENT, "ts": ts}


def produce_user_events(
    bootstrap: Target,
    topic: str,
    events: Iterable[tuple[str, dict[str, Any]]],
    progress: Callable[[int], None] | None = None,
) -> int:
    """Produce (user, event) pairs keyed by user, with the input topics' partitioner."""
    from confluent_kafka import Producer

    producer = Producer(
        client_conf(
            bootstrap,
            **{"partitioner": "murmur2_random", "linger.ms": 20, "enable.idempotence": True, "log_level": 3},
        )
    )
    n = 0
    for user, event in events:
        while True:
            try:
                producer.produce(topic, key=user.encode(), value=orjson.dumps(event))
                break
            except BufferError:
                producer.poll(0.1)
        n += 1
        if progress is not None and n % 1000 == 0:
            progress(1000)
    if producer.flush(60):
        raise NudgeflowError("some events were not delivered within 60 s")
    return n
