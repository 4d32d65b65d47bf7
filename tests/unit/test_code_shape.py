"""The code's shape, checked: one import package, a pure engine, one owner per wire format."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import orjson
import pytest

from nudgeflow.channels.providers import PROVIDERS, ConsoleProvider, UnknownProvider, make_provider
from nudgeflow.engine.io import CallRequest, CallResult, Feedback, ProfileChanged, SendRequest
from nudgeflow.streams import wire
from nudgeflow.streams.events import Decoder

ROOT = Path(__file__).resolve().parents[2]
TOP_LEVEL = re.compile(r"^\s*(from|import) (engine|agents|streams|channels)\b", re.M)


def test_importing_the_engine_pulls_in_no_kafka_faust_rocksdb_or_prometheus() -> None:
    code = (
        "import sys, nudgeflow.engine.core, nudgeflow.engine.loader, nudgeflow.engine.simulate;"
        "bad = [m for m in ('faust', 'confluent_kafka', 'rocksdict', 'prometheus_client', 'aiokafka')"
        " if m in sys.modules]; print(','.join(bad))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_every_module_imports_as_part_of_the_nudgeflow_package() -> None:
    offenders = [
        str(p.relative_to(ROOT))
        for d in ("engine", "agents", "streams", "channels", "nudgeflow", "tests", "bench")
        for p in (ROOT / d).rglob("*.py")
        if not p.is_symlink() and TOP_LEVEL.search(p.read_text())
    ]
    assert offenders == []
    import nudgeflow.engine.core

    where = Path(nudgeflow.engine.core.__file__).resolve()  # core.py, or its compiled build beside it
    assert where.parent == ROOT / "engine" and where.name.split(".")[0] == "core"


def test_send_request_round_trips_through_its_wire_format() -> None:
    fb = SendRequest("k:sms", "sms", "u1", "j", 2, "s", 1, None, {"text": "hi"}, {}, 5, "e1")
    req = SendRequest("k", "push", "u1", "j", 2, "s", 1, "t", {"title": "Hi"}, {"x": [1]}, 5, None, fb)
    enc = wire.encode_send_request(req)
    headers = dict(enc.headers or [])
    assert enc.key == b"u1" and headers["idempotency_key"] == headers["ce_id"] == b"k"
    assert headers["ce_type"] == b"io.nudgeflow.send.push" and headers["ce_time"] == b"1970-01-01T00:00:00.005Z"
    assert headers["ce_specversion"] == b"1.0" and headers["content-type"] == b"application/json"
    assert wire.decode_send_request(enc.value) == req
    with pytest.raises(wire.WireError):
        wire.decode_send_request(b'{"key": 1}')


def test_call_request_result_feedback_and_profile_change_formats() -> None:
    call = CallRequest("k", "u1", "j", "recs", "POST", "http://x/y", {"a": "b"}, {"q": 1}, 3000, 7)
    assert wire.decode_call_request(wire.encode_call_request(call).value) == call
    decoder = Decoder()
    for inp in (CallResult("u1", "k", True, {"items": []}), Feedback("u1", "email", "unreachable")):
        enc = wire.encode_call_result(inp) if isinstance(inp, CallResult) else wire.encode_feedback(inp)
        assert decoder.decode("nudgeflow.feedback", enc.value, 1_800_000_000_000, 1_800_000_000_000) == inp
    doc = wire.encode_profile_change(ProfileChanged("u1", {"vip": True}, 9)).value
    assert doc == b'{"user_id":"u1","ts":9,"attributes":{"vip":true}}'
    assert wire.decode_tick(b'{"user_id": "u1", "due": 5}') == ("u1", 5)
    with pytest.raises(wire.WireError):
        wire.decode_tick(b"{}")


def test_providers_come_from_the_registry() -> None:
    assert "console" in PROVIDERS
    assert isinstance(make_provider("console", "push"), ConsoleProvider)
    every = "available: apns, console, fcm, smtp, twilio, webhook, webpush, whatsapp"
    with pytest.raises(UnknownProvider, match=every):
        make_provider("no-such", "push")


def test_the_send_request_contract_file_is_current_and_messages_validate_against_it() -> None:
    import json

    import jsonschema

    from nudgeflow.engine.io import SendRequest
    from nudgeflow.streams.wire import send_request_json_schema

    path = Path(__file__).resolve().parents[2] / "schemas" / "send-request.v1.json"
    schema = json.loads(path.read_text())
    assert schema == send_request_json_schema(), "regenerate: see README 'Send requests'"
    fb = SendRequest("k:sms", "sms", "u1", "j", 2, "s", 1, None, {"text": "Hi"}, {}, 5, None, None, "+15550100", 99)
    req = SendRequest("k", "email", "u1", "j", 2, "s", 1, "t", {"subject": "Hi"}, {"x": [1]}, 5, "e1", fb, "a@b.c", 9)
    jsonschema.validate(orjson.loads(wire.encode_send_request(req).value), schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({**orjson.loads(wire.encode_send_request(req).value), "schema_version": 2}, schema)
