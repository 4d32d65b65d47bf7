"""Every message nudgeflow writes or reads on its own topics: one module owns each wire format.

Input events from the site (page_viewed, ..., user_profiles) are validated by `streams.events`;
everything nudgeflow produces itself is built and parsed here, so the worker, the senders, the
call runner, `simulate` and the benchmarks cannot drift apart:

    nudgeflow.send.<channel>   send request      SendRequest as JSON; header idempotency_key
    nudgeflow.calls            call request      CallRequest as JSON; header idempotency_key
    nudgeflow.feedback         feedback          {"user_id", "type": "feedback", "channel", "status"}
                               call result       {"user_id", "type": "call_result", "key", "ok", "body"}
    nudgeflow.profile_changes  profile change    {"user_id", "ts", "attributes"}
    nudgeflow.ticks            tick (legacy)     {"user_id", "due"}: still read, no longer written
    nudgeflow.dead_letter      the original key and value; headers reason, detail, source_*
                               (too large for the topic: a stub with sizes and hashes, header stub)

Every message is keyed by user id (the co-partitioning key of the worker's inputs).

Signatures: with a topic secret configured (`NUDGEFLOW_TOPIC_SECRET`), every send request, call
request, call result and feedback message carries header `nudgeflow_sig`, the hex HMAC-SHA256 of
its kind, key and value; their consumers drop (dead-letter, count) what does not verify, so
whoever can produce to these topics without the secret cannot silence a user's channel, put text
into a customer's message or make the call runner call anything (README "Security model").
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TypeVar

import orjson
from pydantic import TypeAdapter, ValidationError

from nudgeflow.engine.errors import NudgeflowError
from nudgeflow.engine.io import FEEDBACK_STATUSES, CallRequest, CallResult, Feedback, ProfileChanged, SendRequest

Headers = list[tuple[str, bytes]]
T = TypeVar("T")
IDEMPOTENCY_HEADER = "idempotency_key"


class WireError(NudgeflowError, ValueError):
    """A message of one of nudgeflow's own formats is malformed (the text says what, never values)."""


@dataclass(frozen=True, slots=True)
class Encoded:
    """A message ready to produce: key (the user id), value and headers."""

    key: bytes
    value: bytes
    headers: Headers | None = None


# --- signatures ------------------------------------------------------------------------------

SIGNATURE_HEADER = "nudgeflow_sig"
SignedKind = str  # "send", "call", "feedback" (feedback and call results share their topic)


class Signer:
    """Signs and verifies nudgeflow's internal messages with the topic secret; without a secret it
    signs nothing and accepts everything (the default, for a cluster where ACLs alone decide who
    may produce: README "Security model")."""

    __slots__ = ("_key",)

    def __init__(self, secret: str | bytes | None = None) -> None:
        self._key = secret.encode() if isinstance(secret, str) else secret

    @property
    def enabled(self) -> bool:
        return bool(self._key)

    def _mac(self, kind: SignedKind, key: bytes | None, value: bytes | None) -> bytes:
        m = hmac.new(self._key or b"", kind.encode(), hashlib.sha256)
        m.update(b"\0%d\0" % len(key or b""))
        m.update(key or b"")
        m.update(value or b"")
        return m.hexdigest().encode()

    def sign(self, kind: SignedKind, enc: Encoded) -> Encoded:
        if not self._key:
            return enc
        return Encoded(
            enc.key, enc.value, [*(enc.headers or []), (SIGNATURE_HEADER, self._mac(kind, enc.key, enc.value))]
        )

    def valid(
        self, kind: SignedKind, key: bytes | None, value: bytes | None, headers: Headers | list[Any] | None
    ) -> bool:
        if not self._key:
            return True
        got = next((v for k, v in headers or () if k == SIGNATURE_HEADER), None)
        return isinstance(got, bytes) and hmac.compare_digest(got, self._mac(kind, key, value))


UNSIGNED = Signer()


# --- send requests ---------------------------------------------------------------------------

_SEND = TypeAdapter(SendRequest)
_CALL = TypeAdapter(CallRequest)


SEND_SCHEMA_VERSION = 1
SEND_SCHEMA_ID = "https://github.com/nudgeflow/nudgeflow/schemas/send-request.v1.json"


def send_request_doc(req: SendRequest) -> dict[str, Any]:
    """The JSON document of a send request (also what `simulate` prints): the contract in
    schemas/send-request.v1.json."""
    return {
        "schema_version": SEND_SCHEMA_VERSION,
        "key": req.key,
        "channel": req.channel,
        "user_id": req.user_id,
        "journey": req.journey,
        "journey_version": req.journey_version,
        "step": req.step,
        "instance": req.instance,
        "template": req.template,
        "content": req.content if req.content.__class__ is dict else dict(req.content),
        "data": req.data if req.data.__class__ is dict else dict(req.data),
        "created_at": req.created_at,
        "trigger_event_id": req.trigger_event_id,
        "to": req.to,
        "expires_at": req.expires_at,
        "fallback": send_request_doc(req.fallback) if req.fallback else None,
    }


def send_request_json_schema() -> dict[str, Any]:
    """JSON Schema of a send request message (schemas/send-request.v1.json, kept current by a test)."""
    schema = _SEND.json_schema()
    body = schema["$defs"]["SendRequest"] if "$defs" in schema else schema
    body["properties"] = {
        "schema_version": {"const": SEND_SCHEMA_VERSION, "description": "this contract's version"},
        **body["properties"],
    }
    body["required"] = ["schema_version", *body.get("required", [])]
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": SEND_SCHEMA_ID,
        "title": "nudgeflow send request, version 1",
        "description": "The value of every message on nudgeflow.send.<channel>. Headers: idempotency_key (= key), "
        "CloudEvents binary mode (ce_specversion, ce_id = key, ce_type, ce_source, ce_time, content-type), "
        "nudgeflow_sig when the topics are signed. Deliver each key once; do not deliver after expires_at.",
        **schema,
    }


_SECONDS: dict[int, bytes] = {}  # epoch second -> "YYYY-MM-DDTHH:MM:SS" (a send a millisecond costs no datetime)
_CE_TYPE: dict[str, bytes] = {}
_CE_SOURCE: dict[str, bytes] = {}


def _iso(ms: int) -> bytes:
    """Epoch milliseconds as RFC 3339 UTC text with milliseconds, e.g. 2026-01-01T00:00:34.217Z."""
    sec, milli = divmod(ms, 1000)
    head = _SECONDS.get(sec)
    if head is None:
        if len(_SECONDS) >= 4096:
            _SECONDS.clear()
        head = _SECONDS[sec] = datetime.fromtimestamp(sec, UTC).strftime("%Y-%m-%dT%H:%M:%S").encode()
    return b"%s.%03dZ" % (head, milli)


def encode_send_request(req: SendRequest, signer: Signer = UNSIGNED) -> Encoded:
    key = req.key.encode()
    ce_type = _CE_TYPE.get(req.channel)
    if ce_type is None:
        ce_type = _CE_TYPE[req.channel] = b"io.nudgeflow.send." + req.channel.encode()
    ce_source = _CE_SOURCE.get(req.journey)
    if ce_source is None:
        if len(_CE_SOURCE) >= 4096:
            _CE_SOURCE.clear()
        ce_source = _CE_SOURCE[req.journey] = b"/nudgeflow/journeys/" + req.journey.encode()
    headers: Headers = [
        (IDEMPOTENCY_HEADER, key),
        ("ce_specversion", b"1.0"),
        ("ce_id", key),
        ("ce_type", ce_type),
        ("ce_source", ce_source),
        ("ce_time", _iso(req.created_at)),
        ("content-type", b"application/json"),
    ]
    return signer.sign("send", Encoded(req.user_id.encode(), orjson.dumps(send_request_doc(req)), headers))


def decode_send_request(value: bytes | None) -> SendRequest:
    return _validated(_SEND, value, "send request")


def _validated(adapter: TypeAdapter[T], value: bytes | None, what: str) -> T:
    try:
        return adapter.validate_python(orjson.loads(value or b""))
    except (orjson.JSONDecodeError, ValidationError) as e:
        raise WireError(f"not a {what}: {type(e).__name__}") from None


# --- call requests and results ---------------------------------------------------------------


def encode_call_request(req: CallRequest, signer: Signer = UNSIGNED) -> Encoded:
    doc = {
        "key": req.key,
        "user_id": req.user_id,
        "journey": req.journey,
        "step": req.step,
        "method": req.method,
        "url": req.url,
        "headers": req.headers,
        "body": req.body,
        "timeout_ms": req.timeout_ms,
        "created_at": req.created_at,
    }
    return signer.sign(
        "call", Encoded(req.user_id.encode(), orjson.dumps(doc), [(IDEMPOTENCY_HEADER, req.key.encode())])
    )


def decode_call_request(value: bytes | None) -> CallRequest:
    return _validated(_CALL, value, "call request")


def encode_call_result(res: CallResult, signer: Signer = UNSIGNED) -> Encoded:
    doc = {"user_id": res.user_id, "type": "call_result", "key": res.key, "ok": res.ok, "body": res.body}
    return signer.sign("feedback", Encoded(res.user_id.encode(), orjson.dumps(doc)))


def encode_feedback(fb: Feedback, signer: Signer = UNSIGNED) -> Encoded:
    doc: dict[str, Any] = {"user_id": fb.user_id, "type": "feedback", "channel": fb.channel, "status": fb.status}
    if fb.key is not None:
        doc.update(key=fb.key, journey=fb.journey, step=fb.step)
    return signer.sign("feedback", Encoded(fb.user_id.encode(), orjson.dumps(doc)))


def decode_feedback(user: str, doc: dict[str, Any]) -> Feedback | CallResult:
    """The feedback topic's two message types (the user id is already validated)."""
    kind = doc.get("type")
    if kind == "feedback":
        ch, status = doc.get("channel"), doc.get("status")
        if isinstance(ch, str) and status in FEEDBACK_STATUSES:
            key, journey, step = doc.get("key"), doc.get("journey"), doc.get("step")
            if all(v is None or isinstance(v, str) for v in (key, journey, step)):
                return Feedback(user, ch, status, key, journey, step)
    elif kind == "call_result":
        key = doc.get("key")
        if isinstance(key, str):
            return CallResult(user, key, bool(doc.get("ok")), doc.get("body"))
    raise WireError(
        "feedback needs type feedback (channel, status: "
        + ", ".join(sorted(FEEDBACK_STATUSES))
        + ") or call_result (key)"
    )


# --- profile changes, ticks, dead letters ----------------------------------------------------


def encode_profile_change(fx: ProfileChanged) -> Encoded:
    doc = {"user_id": fx.user_id, "ts": fx.ts, "attributes": fx.attributes}
    return Encoded(fx.user_id.encode(), orjson.dumps(doc))


def decode_tick(value: bytes | None) -> tuple[str, int]:
    """(user id, due) of a tick message."""
    try:
        doc = orjson.loads(value or b"")
        return str(doc["user_id"]), int(doc["due"])
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
        raise WireError("tick needs user_id and due") from None


def dead_letter_stub(key: bytes | None, value: bytes, headers: Headers) -> tuple[bytes | None, bytes, Headers]:
    """What goes to the dead-letter topic instead of a message too large for it: sizes and
    SHA-256 of key and value; the source_* headers say where the original still is."""
    doc = {
        "stub": True,
        "value_bytes": len(value),
        "value_sha256": hashlib.sha256(value).hexdigest(),
        "key_bytes": len(key or b""),
        "key_sha256": hashlib.sha256(key or b"").hexdigest(),
    }
    short_key = key if key is not None and len(key) <= 256 else None
    return short_key, orjson.dumps(doc), [*headers, ("stub", b"1")]


def dead_letter_headers(reason: str, detail: str, topic: str, partition: int, offset: int) -> Headers:
    """Why a message went to the dead-letter topic and where it came from (no payload values)."""
    return [
        ("reason", reason.encode()),
        ("detail", detail.encode()),
        ("source_topic", topic.encode()),
        ("source_partition", str(partition).encode()),
        ("source_offset", str(offset).encode()),
    ]
