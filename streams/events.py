"""The event schema on the input topics, and validation of raw messages.

Message value (JSON object, UTF-8), keyed by user id:

    {"user_id": "u123",                  # required: text (or a whole number)
     "event": "add_to_cart",             # optional on page_viewed/add_to_cart/charged (the topic
                                         #   names it); required on custom_events
     "ts": 1767225600000,                # event time: epoch ms or ISO-8601; default: Kafka timestamp
     "props": {"product": "Red hoodie"}, # optional object of event properties
     "event_id": "e-1"}                  # optional

user_profiles: {"user_id", "ts", "attributes": {...}}; nudgeflow.feedback: {"user_id", "type":
"feedback", "channel", "status"} or {"user_id", "type": "call_result", "key", "ok", "body"}.
Anything else is rejected with a reason from REASONS and goes to the dead-letter topic.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson

from nudgeflow.engine.io import Enroll, Event, Input, ProfileUpdate
from nudgeflow.engine.timeparse import datetime_to_ms, parse_iso
from nudgeflow.streams.topics import CUSTOM_TOPIC, EVENT_TOPICS, PROFILE_TOPIC, Topics
from nudgeflow.streams.wire import WireError, decode_feedback

REASONS = (
    "too_large",
    "not_json",
    "not_object",
    "missing_user_id",
    "bad_user_id",
    "missing_event",
    "bad_event",
    "bad_timestamp",
    "bad_props",
    "bad_message",
    "too_deep",
    "quarantine_overflow",
    "key_mismatch",
    "missing_key",
)
MIN_TS = 946_684_800_000  # 2000-01-01: anything earlier is a unit mistake (seconds, not ms)
ENROLL_EVENT = "nudgeflow.enroll"  # custom event: {"props": {"journey": id}} enters a user
RELEASE_EVENT = "nudgeflow.release"  # custom event: lifts the user's quarantine (`nudgeflow release`)
MAX_DEPTH = 32  # nesting of props / attributes / call answers: deeper input is rejected (too_deep)


@dataclass(slots=True)
class Release:
    """Release a quarantined user (not an engine input: the worker's batch core handles it)."""

    user_id: str
    ts: int


@dataclass(slots=True)
class Invalid:
    reason: str  # one of REASONS
    detail: str  # what exactly was wrong; never contains field values (no PII in logs)


class Decoder:
    """Turns (topic, key, value, kafka timestamp) into an engine input or an Invalid."""

    def __init__(
        self, max_bytes: int = 65536, max_future_ms: int = 86_400_000, prefix: str = "", topics: Topics | None = None
    ) -> None:
        self.max_bytes, self.max_future_ms = max_bytes, max_future_ms
        self.topics = topics or Topics(prefix)
        self._base: dict[str, str] = {}

    def base(self, topic: str) -> str:
        """The topic's role (its name without the prefix, or the role a site's topic stands in
        for), remembered per topic."""
        base = self._base.get(topic)
        if base is None:
            base = self._base[topic] = self.topics.base(topic)
        return base

    def decode(self, topic: str, value: bytes | None, kafka_ts: int | None, now_ms: int) -> Input | Release | Invalid:
        if value is None:
            return Invalid("not_json", "empty message (tombstone)")
        if len(value) > self.max_bytes:
            return Invalid("too_large", f"{len(value)} bytes > limit {self.max_bytes}")
        try:
            doc = orjson.loads(value)
        except orjson.JSONDecodeError as e:
            return Invalid("not_json", f"not JSON: {str(e).split(':')[0]}")
        if doc.__class__ is not dict:
            return Invalid("not_object", f"a JSON {type(doc).__name__}, not an object")
        # nesting cannot exceed the number of opening brackets: most messages need no walk
        if value.count(b"{") + value.count(b"[") > MAX_DEPTH and not within_depth(doc, MAX_DEPTH):
            return Invalid("too_deep", f"nested deeper than {MAX_DEPTH} levels")
        user = doc.get("user_id")
        if user.__class__ is not str or not user or len(user) > 256:
            if user is None or user == "":
                return Invalid("missing_user_id", "no user_id")
            if isinstance(user, int) and not isinstance(user, bool):
                user = str(user)
            if not isinstance(user, str) or len(user) > 256:
                return Invalid("bad_user_id", "user_id must be text of at most 256 characters")
        ts = doc.get("ts")
        if ts.__class__ is not int or ts < MIN_TS or ts > now_ms + self.max_future_ms:
            ts = self._ts(ts, kafka_ts, now_ms)
            if isinstance(ts, Invalid):
                return ts
        base = self.base(topic)
        if base == PROFILE_TOPIC:
            attrs = doc.get("attributes")
            if not isinstance(attrs, dict):
                return Invalid("bad_props", "attributes must be an object")
            return ProfileUpdate(user, ts, attrs)
        if base.endswith("nudgeflow.feedback"):
            try:
                return decode_feedback(user, doc)
            except WireError as e:
                return Invalid("bad_message", str(e))
        props = doc.get("props")
        if props.__class__ is not dict:
            if props is not None:
                return Invalid("bad_props", "props must be an object")
            props = {}
        name = doc.get("event")
        if name is None:
            name = EVENT_TOPICS.get(base)
            if name is None:
                return Invalid("missing_event", f"no event name (required on {CUSTOM_TOPIC})")
        if name.__class__ is not str or not name or len(name) > 128:
            return Invalid("bad_event", "event must be non-empty text of at most 128 characters")
        event_id = doc.get("event_id")
        if event_id is not None and event_id.__class__ is not str:
            event_id = str(event_id)
        if name == RELEASE_EVENT:
            return Release(user, ts)
        if name == ENROLL_EVENT:
            journey = props.get("journey")
            if not isinstance(journey, str):
                return Invalid("bad_props", f"{ENROLL_EVENT} needs props.journey")
            return Enroll(user, journey, ts, props)
        return Event(user, name, ts, props, event_id)

    def _ts(self, raw: Any, kafka_ts: int | None, now_ms: int) -> int | Invalid:
        if raw is None:
            if kafka_ts is None or kafka_ts <= 0:
                return Invalid("bad_timestamp", "no ts and no Kafka timestamp")
            ts = kafka_ts
        elif isinstance(raw, bool):
            return Invalid("bad_timestamp", "ts must be epoch milliseconds or ISO-8601 text")
        elif isinstance(raw, (int, float)):
            ts = int(raw)
            if ts < MIN_TS:
                return Invalid("bad_timestamp", "ts before 2000-01-01: epoch seconds? send milliseconds")
        elif isinstance(raw, str):
            d = parse_iso(raw)
            if d is None:
                return Invalid("bad_timestamp", "ts text is not ISO-8601")
            ts = datetime_to_ms(d)
            if ts < MIN_TS:
                return Invalid("bad_timestamp", "ts before 2000-01-01")
        else:
            return Invalid("bad_timestamp", "ts must be epoch milliseconds or ISO-8601 text")
        if ts > now_ms + self.max_future_ms:
            return Invalid("bad_timestamp", f"ts more than {self.max_future_ms // 1000}s in the future")
        return ts


def within_depth(doc: Any, limit: int) -> bool:
    """Whether objects and arrays nest at most `limit` levels (iterative: no recursion limit)."""
    todo: list[tuple[Any, int]] = [(doc, 1)]
    while todo:
        v, depth = todo.pop()
        if isinstance(v, dict):
            children: Any = v.values()
        elif isinstance(v, list):
            children = v
        else:
            continue
        if depth > limit:
            return False
        todo.extend((c, depth + 1) for c in children if isinstance(c, (dict, list)))
    return True
