"""The security model (README "Security model"): fixed call hosts, the outbound policy against a
real local HTTP server, signed internal topics, bounded state and answers, template errors never
sent, and a restarted call runner that does not repeat an answered call."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from prometheus_client import REGISTRY

from nudgeflow.agents.batch import BatchCore, Raw
from nudgeflow.channels.calls import CallRunner
from nudgeflow.channels.outbound import Outbound, OutboundPolicy, Refused, TooLarge
from nudgeflow.engine.errors import JourneyFileErrors
from nudgeflow.engine.io import CallRequest
from nudgeflow.streams import wire
from nudgeflow.streams.events import Decoder
from nudgeflow.streams.topics import Topics
from tests.apis import ApiHandler, start
from tests.unit.journeys import T0, seeds, texts
from tests.unit.test_batch import MemStore, cart, msg

HITS: list[tuple[str, str]] = []


class Api(ApiHandler):
    def _answer(self) -> None:
        HITS.append((self.command, self.path))
        if self.path.startswith("/big"):
            self.answer(200, {"x": "a" * 100_000})
        elif self.path.startswith("/to-metadata"):
            self.answer(302, None, [("Location", "http://169.254.169.254/latest/meta-data/")])
        elif self.path.startswith("/to-ok"):
            self.answer(307, None, [("Location", "/ok")])
        else:
            self.answer(200, {"ok": True, "host": self.headers["host"]})

    do_GET = do_POST = _answer


@pytest.fixture(scope="module")
def api() -> Iterator[str]:
    base, stop = start(Api)
    yield base
    stop()


def refused(kind: str, reason: str) -> float:
    return REGISTRY.get_sample_value("nudgeflow_outbound_refused_total", {"kind": kind, "reason": reason}) or 0.0


def fetch(policy: OutboundPolicy, url: str, max_bytes: int = 32 * 1024) -> Any:
    async def go() -> Any:
        http = Outbound(policy, max_bytes, kind="test")
        try:
            return await http.request("GET", url, timeout=5)
        finally:
            await http.aclose()

    return asyncio.run(go())


# --- journeys: the host of a call is fixed text ---------------------------------------------------


@pytest.mark.parametrize(
    "url",
    [
        "{{ profile.website }}/v1/x",
        "https://{{ profile.host }}/v1/x",
        "https://api.example.com{{ trigger.path }}",
        "https://api.example.com.{{ trigger.domain }}/x",
        "ftp://api.example.com/x",
    ],
)
def test_a_templated_call_host_is_rejected_at_validate(url: str) -> None:
    doc = f"""journey: j
name: J
entry: {{event: go}}
steps:
  fetch: {{call: "{url}", save_as: recs}}
"""
    with pytest.raises(JourneyFileErrors) as e:
        texts(j=doc)
    assert "j.yaml:5: steps.fetch.call:" in str(e.value), str(e.value)


def test_a_fixed_host_with_templated_path_and_query_is_valid() -> None:
    url = "https://api.example.com/u/{{ user.id }}?q={{ trigger.q }}"
    js = texts(j=f'journey: j\nname: J\nentry: {{event: go}}\nsteps:\n  f: {{call: "{url}", save_as: r}}\n')
    assert "j" in js.journeys


# --- the outbound policy, against a real local server ---------------------------------------------


def test_loopback_private_and_metadata_addresses_are_refused_and_counted(api: str) -> None:
    policy = OutboundPolicy()
    before = refused("test", "address_not_allowed")
    for url in (
        f"{api}/ok",
        "http://10.1.2.3/x",
        "http://169.254.169.254/latest/meta-data/",
        "http://[::1]/x",
        "http://[::ffff:127.0.0.1]/x",
        "http://0.0.0.0/x",
        "http://localhost/x",
    ):
        with pytest.raises(Refused) as e:
            fetch(policy, url)
        assert e.value.reason == "address_not_allowed", url
    assert refused("test", "address_not_allowed") == before + 7
    assert ("GET", "/ok") not in HITS


def test_a_host_outside_the_allowlist_is_refused_and_an_allowed_local_server_is_called(api: str) -> None:
    port = int(api.rsplit(":", 1)[1])
    with pytest.raises(Refused) as e:
        fetch(OutboundPolicy(["api.example.com"], ["127.0.0.1/32"]), f"{api}/ok")
    assert e.value.reason == "host_not_allowed"
    ans = fetch(OutboundPolicy([f"127.0.0.1:{port}"], ["127.0.0.1/32"]), f"{api}/ok")
    assert ans.status == 200 and orjson.loads(ans.body) == {"ok": True, "host": f"127.0.0.1:{port}"}
    assert OutboundPolicy(["*.example.com"]).host_allowed("api.example.com", 443)
    assert not OutboundPolicy(["*.example.com"]).host_allowed("example.com.evil.net", 443)


def test_a_redirect_to_a_refused_address_is_not_followed_and_an_allowed_one_is(api: str) -> None:
    policy = OutboundPolicy(allow_networks=["127.0.0.1/32"])
    HITS.clear()
    with pytest.raises(Refused) as e:
        fetch(policy, f"{api}/to-metadata")
    assert e.value.reason == "address_not_allowed" and HITS == [("GET", "/to-metadata")]
    assert fetch(policy, f"{api}/to-ok").status == 200 and HITS[-1] == ("GET", "/ok")


def test_an_oversized_answer_is_cut_and_counted(api: str) -> None:
    before = refused("test", "too_large")
    with pytest.raises(TooLarge):
        fetch(OutboundPolicy(allow_networks=["127.0.0.1/32"]), f"{api}/big", max_bytes=32 * 1024)
    assert refused("test", "too_large") == before + 1


# --- signed internal topics -----------------------------------------------------------------------


def test_forged_feedback_has_no_effect_and_signed_feedback_does() -> None:
    signer = wire.Signer("s3cret")
    c = BatchCore(seeds("clevertap-cart-inaction.yaml"), Topics(), Decoder(), clock=lambda: T0 / 1000, signer=signer)
    store = MemStore()
    doc = {"user_id": "u1", "type": "feedback", "channel": "push", "status": "unreachable"}
    forged = wire.Signer("guess").sign("feedback", wire.Encoded(b"u1", orjson.dumps(doc)))
    for m in (
        msg("nudgeflow.feedback", 0, doc),
        Raw("nudgeflow.feedback", 0, 1, b"u1", forged.value, T0, forged.headers),
    ):
        out = c.run([m], store)
        assert out.invalid == [("nudgeflow.feedback", "bad_signature")] and out.writes == {}
        assert dict(out.records[0].headers or [])["reason"] == b"bad_signature"
    good = signer.sign("feedback", wire.Encoded(b"u1", orjson.dumps(doc)))
    out = c.run([Raw("nudgeflow.feedback", 0, 2, b"u1", good.value, T0, good.headers)], store)
    assert out.invalid == [] and orjson.loads(out.writes[0][0][1])["state"]["profile"] == {"reachable_push": False}


def test_sends_and_calls_are_signed_with_the_topic_secret() -> None:
    signer = wire.Signer("s3cret")
    c = BatchCore(seeds("clevertap-cart-inaction.yaml"), Topics(), Decoder(), clock=lambda: T0 / 1000, signer=signer)
    store = MemStore()
    store.apply(c.run([cart("u1", 0)], store), c)
    out = c.run([msg("nudgeflow.ticks", 0, {"user_id": "u1", "due": T0 + 30 * 60_000})], store)
    (send,) = [r for r in out.records if r.topic == "nudgeflow.send.push"]
    assert signer.valid("send", send.key, send.value, send.headers)
    assert not signer.valid("send", send.key, send.value.replace(b"Hoodie", b"Scam!!"), send.headers)
    assert not signer.valid("feedback", send.key, send.value, send.headers)  # not valid on another topic


# --- bounded state, bounded text ------------------------------------------------------------------


def test_a_user_with_100k_events_keeps_a_bounded_state_record() -> None:
    c = BatchCore(seeds("."), Topics(), Decoder(), clock=lambda: T0 / 1000 + 200_000, cache_users=0)
    store = MemStore()
    sizes = []
    for b in range(10):
        batch = [
            msg(
                topic,
                b * 10_000 + i,
                {"user_id": "heavy", "ts": T0 + (b * 10_000 + i) * 1000, "props": {"product": "p"}},
            )
            for i in range(10_000)
            for topic in (("product_viewed", "add_to_cart")[i % 2],)
        ]
        out = c.run(batch, store)
        store.apply(out, c)
        sizes.append(len(store.data[0][b"u:heavy"]) if b"u:heavy" in store.data[0] else 0)
    assert 0 < max(sizes) < 32 * 1024, sizes
    assert max(sizes[5:]) <= max(sizes[:5]) * 1.1  # it stopped growing


def test_an_input_that_would_exceed_the_state_cap_is_dead_lettered_and_the_user_goes_on() -> None:
    c = BatchCore(
        seeds("clevertap-cart-inaction.yaml"), Topics(), Decoder(), clock=lambda: T0 / 1000, state_max_bytes=8192
    )
    store = MemStore()
    big = {f"attr_{i}": "x" * 100 for i in range(120)}  # ~14 KB of profile attributes
    out = c.run([msg("user_profiles", 0, {"user_id": "u1", "ts": T0, "attributes": big}), cart("u1", 0)], store)
    assert ("user_profiles", "state_too_large") in out.invalid
    rec = orjson.loads(out.writes[0][0][1])
    assert "attr_0" not in rec["state"]["profile"] and "clevertap-cart-inaction" in rec["state"]["instances"]


def test_a_template_error_or_runaway_text_is_never_sent() -> None:
    from nudgeflow.engine.core import process
    from nudgeflow.engine.io import Event, SendRequest
    from nudgeflow.engine.state import new_state

    js = texts(
        j="""journey: j
name: J
entry: {event: go}
steps:
  broken: {send: push, title: "{{ trigger.items[5].name }}", next: long}
  long: {send: push, title: "{{ trigger.blob }}{{ trigger.blob }}", next: missing}
  missing: {send: push, title: "Hi {{ profile.first_name }}, your order", next: divide}
  divide: {send: push, title: "{{ trigger.price / trigger.qty }} each", next: fine}
  fine: {send: push, title: "Hi {{ profile.first_name | default('there') }}{% if profile.vip %}, VIP{% endif %}"}
"""
    )
    trigger = {"items": 3, "blob": "z" * 40_000, "price": 10, "qty": 0}
    fx = process(new_state(), Event("u1", "go", T0, trigger, "e1"), T0, js).effects
    sends = [f for f in fx if isinstance(f, SendRequest)]
    assert [(s.step, s.content["title"]) for s in sends] == [("fine", "Hi there")]
    errors = sorted(f.detail for f in fx if getattr(f, "kind", None) == "template_error")
    assert errors == ["broken", "divide", "long", "missing"]


# --- the call runner does not repeat a call across restarts ---------------------------------------


def test_a_restarted_call_runner_does_not_repeat_an_answered_or_interrupted_post(api: str, tmp_path: Path) -> None:
    policy = OutboundPolicy(allow_networks=["127.0.0.1/32"])
    signer = wire.Signer("k")

    def runner() -> CallRunner:
        r = CallRunner("127.0.0.1:1", Topics(), "g", tmp_path, policy=policy, signer=signer)
        r.keys.journal = None  # no broker here: the keys stay local (the keys topic is tested in integration)
        return r

    def request(key: str) -> Raw:
        enc = wire.encode_call_request(
            CallRequest(key, "u1", "j", "s", "POST", f"{api}/ok?k={key}", {}, {"a": 1}, 5000, T0), signer
        )
        return Raw("nudgeflow.calls", 0, 0, enc.key, enc.value, T0, enc.headers)

    async def run(r: CallRunner, m: Raw) -> None:
        await r.handle([m])
        await r.close()

    HITS.clear()
    first = runner()
    asyncio.run(run(first, request("k1")))
    assert first.ok == 1 and HITS == [("POST", "/ok?k=k1")]
    first.keys.begin("k2")  # a crash between marking k2 started and answering it
    first.keys.close()
    second = runner()
    asyncio.run(run(second, request("k1")))
    asyncio.run(run(second, request("k2")))
    assert second.duplicates == 1 and second.failed == 1 and HITS == [("POST", "/ok?k=k1")]
    forged = request("k3")
    asyncio.run(run(second, Raw(forged.topic(), 0, 1, forged.key(), forged.value(), T0, [])))
    assert second.forged == 1 and HITS == [("POST", "/ok?k=k1")]
    second.keys.close()
