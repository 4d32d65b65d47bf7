"""Edge validation: every bad input has a reason; good inputs become engine inputs."""

import orjson
import pytest

from nudgeflow.engine.io import Enroll, Event, Feedback, ProfileUpdate
from nudgeflow.streams.events import Decoder, Invalid

NOW = 1_767_225_600_000
dec = Decoder(max_bytes=1000, max_future_ms=3_600_000)


def decode(topic: str, value: object, kafka_ts: int | None = NOW) -> object:
    raw = value if isinstance(value, bytes) else orjson.dumps(value)
    return dec.decode(topic, raw, kafka_ts, NOW)


def test_valid_event_on_named_topic_takes_the_topic_name() -> None:
    ev = decode("add_to_cart", {"user_id": "u1", "ts": NOW, "props": {"product": "Hoodie"}, "event_id": 7})
    assert ev == Event("u1", "add_to_cart", NOW, {"product": "Hoodie"}, "7")


def test_iso_timestamp_and_numeric_user_id() -> None:
    ev = decode("charged", {"user_id": 42, "ts": "2026-01-01T00:00:00Z"})
    assert ev == Event("42", "charged", NOW, {}, None)


def test_missing_ts_falls_back_to_kafka_timestamp() -> None:
    assert decode("page_viewed", {"user_id": "u1"}, kafka_ts=NOW - 5).ts == NOW - 5  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        (b"{not json", "not_json"),
        (b"\xff\xfe", "not_json"),
        ([1, 2], "not_object"),
        ({"ts": NOW}, "missing_user_id"),
        ({"user_id": ""}, "missing_user_id"),
        ({"user_id": {"a": 1}}, "bad_user_id"),
        ({"user_id": "u", "ts": "yesterday"}, "bad_timestamp"),
        ({"user_id": "u", "ts": 1_767_225_600}, "bad_timestamp"),  # seconds, not ms
        ({"user_id": "u", "ts": NOW + 7_200_000}, "bad_timestamp"),  # too far in the future
        ({"user_id": "u", "ts": True}, "bad_timestamp"),
        ({"user_id": "u", "props": [1]}, "bad_props"),
        ({"user_id": "u", "event": 5}, "bad_event"),
        (b'{"user_id": "u", "pad": "' + b"x" * 2000 + b'"}', "too_large"),
    ],
)
def test_bad_inputs_have_reasons(value: object, reason: str) -> None:
    got = decode("add_to_cart", value)
    assert isinstance(got, Invalid) and got.reason == reason
    assert "u1" not in got.detail  # details never echo payload values


def test_custom_topic_needs_an_event_name() -> None:
    assert decode("custom_events", {"user_id": "u"}) == Invalid(
        "missing_event", "no event name (required on custom_events)"
    )
    assert decode("custom_events", {"user_id": "u", "event": "app_installed", "ts": NOW}).name == "app_installed"  # type: ignore[attr-defined]


def test_missing_timestamp_everywhere_is_rejected() -> None:
    got = decode("add_to_cart", {"user_id": "u"}, kafka_ts=None)
    assert isinstance(got, Invalid) and got.reason == "bad_timestamp"


def test_profiles_feedback_and_enroll() -> None:
    assert decode("user_profiles", {"user_id": "u", "ts": NOW, "attributes": {"city": "Pune"}}) == ProfileUpdate(
        "u", NOW, {"city": "Pune"}
    )
    assert decode(
        "nudgeflow.feedback", {"user_id": "u", "type": "feedback", "channel": "email", "status": "unreachable"}
    ) == Feedback("u", "email", "unreachable")
    got = decode("custom_events", {"user_id": "u", "event": "nudgeflow.enroll", "ts": NOW, "props": {"journey": "j"}})
    assert got == Enroll("u", "j", NOW, {"journey": "j"})


def test_prefix_is_stripped_before_topic_rules() -> None:
    d = Decoder(prefix="t1.")
    assert d.decode("t1.charged", orjson.dumps({"user_id": "u", "ts": NOW}), None, NOW).name == "charged"  # type: ignore[union-attr]


def test_a_sites_own_topics_stand_in_for_input_roles() -> None:
    from nudgeflow.engine.io import Event
    from nudgeflow.settings import Settings
    from nudgeflow.streams.events import Decoder

    s = Settings(input_topics="charged=shop.orders, add_to_cart=shop.cart")  # type: ignore[arg-type]
    topics = s.topics()
    assert topics.name("charged") == "shop.orders" and "shop.cart" in topics.inputs
    assert topics.name("page_viewed") == "page_viewed" and topics.base("shop.orders") == "charged"
    inp = Decoder(topics=topics).decode("shop.orders", b'{"user_id": "u1", "ts": 1767225600000}', None, 1767225600000)
    assert isinstance(inp, Event) and inp.name == "charged"
    assert Settings(input_topics='{"custom_events": "site.events"}').topics().name("custom_events") == "site.events"  # type: ignore[arg-type]
    import pydantic
    import pytest

    with pytest.raises(pydantic.ValidationError, match="unknown input roles"):
        Settings(input_topics="orders=shop.orders")  # type: ignore[arg-type]
