"""Providers against real local servers that speak their protocol: SMTP (aiosmtpd) and the Twilio
Messages API (a local HTTP server of the same shape). The exact request each receives, and each
answer class mapped to delivered / unreachable / transient / permanent."""

from __future__ import annotations

import asyncio
import base64
import email
import json
import threading
from collections.abc import Iterator
from typing import Any, ClassVar
from urllib.parse import parse_qs

import pytest
from aiosmtpd.controller import Controller

from nudgeflow.broker import free_port
from nudgeflow.channels.providers import (
    Permanent,
    SmtpProvider,
    SmtpSettings,
    Transient,
    TwilioProvider,
    TwilioSettings,
    Unreachable,
)
from nudgeflow.engine.io import SendRequest
from tests.apis import ApiHandler, start


def req(channel: str, to: str | None, **content: str) -> SendRequest:
    return SendRequest("key-1", channel, "u1", "j", 1, "s", 1, None, content, {}, 5, None, None, to, None)


# --- SMTP ------------------------------------------------------------------------------------------


class Mailbox:
    def __init__(self) -> None:
        self.messages: list[tuple[str, list[str], bytes]] = []

    async def handle_RCPT(self, server: Any, session: Any, envelope: Any, address: str, options: Any) -> str:
        if address.startswith("bounce"):
            return "550 5.1.1 no such user"
        if address.startswith("later"):
            return "451 4.3.0 try again later"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.messages.append((envelope.mail_from, list(envelope.rcpt_tos), envelope.content))
        return "250 Message accepted"


@pytest.fixture()
def smtp() -> Iterator[tuple[Mailbox, SmtpProvider]]:
    box = Mailbox()
    port = free_port()
    ctl = Controller(box, hostname="127.0.0.1", port=port)
    ctl.start()
    settings = SmtpSettings(host="127.0.0.1", port=port, sender="shop@example.com", starttls=False)
    yield box, SmtpProvider(settings)
    ctl.stop()


def test_smtp_delivers_subject_text_and_html_with_the_key_as_message_id(smtp: tuple[Mailbox, SmtpProvider]) -> None:
    box, provider = smtp
    r = req("email", "ann@example.com", subject="A plan for you", text="Plain", html="<p>Rich</p>")
    assert asyncio.run(provider.deliver(r)) == "<key-1@nudgeflow>"
    ((mail_from, rcpts, raw),) = box.messages
    msg = email.message_from_bytes(raw)
    assert mail_from == "shop@example.com" and rcpts == ["ann@example.com"]
    assert msg["Subject"] == "A plan for you" and msg["Message-ID"] == "<key-1@nudgeflow>"
    parts = {
        p.get_content_type(): p.get_payload(decode=True).decode().strip() for p in msg.walk() if not p.is_multipart()
    }
    assert parts == {"text/plain": "Plain", "text/html": "<p>Rich</p>"}


def test_smtp_answers_map_to_unreachable_transient_and_no_address(smtp: tuple[Mailbox, SmtpProvider]) -> None:
    _, provider = smtp
    with pytest.raises(Unreachable):
        asyncio.run(provider.deliver(req("email", "bounce@example.com", subject="x", text="y")))
    with pytest.raises(Transient):
        asyncio.run(provider.deliver(req("email", "later@example.com", subject="x", text="y")))
    with pytest.raises(Unreachable):
        asyncio.run(provider.deliver(req("email", None, subject="x", text="y")))
    down = SmtpProvider(SmtpSettings(host="127.0.0.1", port=free_port(), sender="s@e.com", starttls=False, timeout_s=2))
    with pytest.raises(Transient):
        asyncio.run(down.deliver(req("email", "ann@example.com", subject="x", text="y")))


# --- Twilio ----------------------------------------------------------------------------------------


class Twilio(ApiHandler):
    seen: ClassVar[list[tuple[str, str, dict[str, list[str]]]]] = []
    script: ClassVar[dict[str, list[tuple[int, dict[str, Any]]]]] = {}  # To -> answers in order

    def do_POST(self) -> None:
        form = parse_qs(self.rfile.read(int(self.headers["content-length"])).decode())
        Twilio.seen.append((self.path, self.headers["authorization"], form))
        answers = Twilio.script.get(form["To"][0], [])
        status, body = answers.pop(0) if answers else (201, {"sid": "SM" + str(len(Twilio.seen)), "status": "queued"})
        self.answer(status, body)


@pytest.fixture()
def twilio(monkeypatch: pytest.MonkeyPatch) -> Iterator[TwilioProvider]:
    base, stop = start(Twilio)
    monkeypatch.setenv("NUDGEFLOW_OUTBOUND_ALLOW_NETWORKS", "127.0.0.1/32")
    Twilio.seen.clear()
    settings = TwilioSettings(
        account_sid="AC123",
        auth_token="tok",  # type: ignore[arg-type]
        from_number="+15550001",
        base_url=base,
    )
    yield TwilioProvider(settings, "sms")
    stop()


def test_twilio_gets_the_messages_api_request_and_its_answers_are_classified(twilio: TwilioProvider) -> None:
    Twilio.script = {
        "+15559990000": [(400, {"code": 21211, "message": "invalid To"})],
        "+15559990001": [(503, {"message": "busy"})],
        "+15559990002": [(400, {"code": 21604, "message": "Body required"})],
        "+15559990003": [(429, {"message": "slow down"})],
    }

    async def go(to: str) -> str | None:
        return await twilio.deliver(req("sms", to, text="Your plan"))

    assert asyncio.run(go("+15550100")) == "SM1"
    path, auth, form = Twilio.seen[0]
    assert path == "/2010-04-01/Accounts/AC123/Messages.json"
    assert auth == "Basic " + base64.b64encode(b"AC123:tok").decode()
    assert form == {"To": ["+15550100"], "From": ["+15550001"], "Body": ["Your plan"]}
    with pytest.raises(Unreachable):
        asyncio.run(go("+15559990000"))
    with pytest.raises(Transient):
        asyncio.run(go("+15559990001"))
    with pytest.raises(Permanent):
        asyncio.run(go("+15559990002"))
    with pytest.raises(Transient):
        asyncio.run(go("+15559990003"))
    with pytest.raises(Unreachable):
        asyncio.run(go(None))  # type: ignore[arg-type]


# --- WhatsApp Cloud API --------------------------------------------------------------------------


class Graph(ApiHandler):
    seen: ClassVar[list[tuple[str, str, dict[str, Any]]]] = []
    errors: ClassVar[dict[str, tuple[int, int]]] = {}  # to -> (HTTP status, error code)

    def do_POST(self) -> None:
        doc = json.loads(self.rfile.read(int(self.headers["content-length"])))
        Graph.seen.append((self.path, self.headers["authorization"], doc))
        status, code = Graph.errors.get(doc["to"], (200, 0))
        body = (
            {"messaging_product": "whatsapp", "messages": [{"id": f"wamid.{len(Graph.seen)}"}]}
            if status == 200
            else {"error": {"message": "no", "type": "OAuthException", "code": code}}
        )
        self.answer(status, body)


def test_whatsapp_sends_template_messages_and_classifies_the_graph_api_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    from nudgeflow.channels.providers import WhatsAppProvider, WhatsAppSettings

    base, stop = start(Graph)
    monkeypatch.setenv("NUDGEFLOW_OUTBOUND_ALLOW_NETWORKS", "127.0.0.1/32")
    Graph.errors = {"15559990000": (400, 131026), "15559990001": (400, 130429), "15559990002": (400, 132001)}
    provider = WhatsAppProvider(
        WhatsAppSettings(
            phone_number_id="1057",
            access_token="EAAB",  # type: ignore[arg-type]
            base_url=f"{base}/v21.0",
        )
    )
    try:
        r = SendRequest(
            "k",
            "whatsapp",
            "u1",
            "j",
            1,
            "s",
            1,
            "emi_reminder",
            {},
            {"params": ["Asha", "12 Dec"]},
            5,
            None,
            None,
            "+15550100",
            None,
        )
        assert asyncio.run(provider.deliver(r)) == "wamid.1"
        path, auth, doc = Graph.seen[0]
        assert path == "/v21.0/1057/messages" and auth == "Bearer EAAB"
        assert doc == {
            "messaging_product": "whatsapp",
            "to": "15550100",
            "type": "template",
            "template": {
                "name": "emi_reminder",
                "language": {"code": "en"},
                "components": [
                    {
                        "type": "body",
                        "parameters": [{"type": "text", "text": "Asha"}, {"type": "text", "text": "12 Dec"}],
                    }
                ],
            },
        }
        for to, error in (("+15559990000", Unreachable), ("+15559990001", Transient), ("+15559990002", Permanent)):
            with pytest.raises(error):
                asyncio.run(provider.deliver(req("whatsapp", to, text="hi")))
    finally:
        stop()


# --- FCM HTTP v1 ---------------------------------------------------------------------------------


class Google(ApiHandler):
    public_key: ClassVar[Any] = None
    token_uri: ClassVar[str] = ""
    grants: ClassVar[list[dict[str, Any]]] = []
    sends: ClassVar[list[tuple[str, dict[str, Any]]]] = []

    def do_POST(self) -> None:
        import jwt

        raw = self.rfile.read(int(self.headers["content-length"]))
        if self.path == "/token":
            form = parse_qs(raw.decode())
            claims = jwt.decode(
                form["assertion"][0], Google.public_key, algorithms=["RS256"], audience=Google.token_uri
            )
            Google.grants.append(claims)
            self.answer(200, {"access_token": f"ya29.{len(Google.grants)}", "expires_in": 3599, "token_type": "Bearer"})
            return
        doc = json.loads(raw)
        Google.sends.append((self.headers["authorization"], doc))
        token = doc["message"]["token"]
        if token == "stale":
            self.answer(
                404, {"error": {"code": 404, "status": "NOT_FOUND", "details": [{"errorCode": "UNREGISTERED"}]}}
            )
        elif token == "busy":
            self.answer(503, {"error": {"code": 503, "status": "UNAVAILABLE"}})
        else:
            self.answer(200, {"name": f"projects/p1/messages/{len(Google.sends)}"})


def test_fcm_signs_a_service_account_assertion_and_sends_v1_messages(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Any
) -> None:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    from nudgeflow.channels.providers import FcmProvider, FcmSettings

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    base, stop = start(Google)
    Google.public_key, Google.token_uri = key.public_key(), f"{base}/token"
    account = {
        "type": "service_account",
        "project_id": "p1",
        "client_email": "nf@p1.iam.gserviceaccount.com",
        "private_key": pem.decode(),
        "token_uri": f"{base}/token",
    }
    (tmp_path / "sa.json").write_text(json.dumps(account))
    monkeypatch.setenv("NUDGEFLOW_OUTBOUND_ALLOW_NETWORKS", "127.0.0.1/32")
    provider = FcmProvider(FcmSettings(service_account_file=tmp_path / "sa.json", base_url=base))
    try:
        r = SendRequest(
            "key-9",
            "push",
            "u1",
            "j",
            1,
            "s",
            1,
            None,
            {"title": "Still there?", "body": "Your cart"},
            {"cart": {"id": 7}},
            5,
            None,
            None,
            "device-token-1",
            None,
        )

        async def go() -> list[Any]:
            out: list[Any] = [await provider.deliver(r), await provider.deliver(r)]
            for token, error in (("stale", Unreachable), ("busy", Transient)):
                try:
                    await provider.deliver(req("push", token, title="x"))
                except error as e:
                    out.append(type(e).__name__)
            return out

        assert asyncio.run(go()) == ["projects/p1/messages/1", "projects/p1/messages/2", "Unreachable", "Transient"]
        assert len(Google.grants) == 1  # the access token is reused until it nears expiry
        claims = Google.grants[0]
        assert claims["iss"] == "nf@p1.iam.gserviceaccount.com"
        assert claims["scope"] == "https://www.googleapis.com/auth/firebase.messaging"
        auth, doc = Google.sends[0]
        assert auth == "Bearer ya29.1"
        assert doc == {
            "message": {
                "token": "device-token-1",
                "notification": {"title": "Still there?", "body": "Your cart"},
                "data": {"cart": '{"id":7}', "nudgeflow_key": "key-9"},
            }
        }
    finally:
        stop()


# --- Web Push (VAPID, aes128gcm) -----------------------------------------------------------------


class PushService(ApiHandler):
    received: ClassVar[list[tuple[str, dict[str, str], bytes]]] = []
    gone: ClassVar[set[str]] = set()

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["content-length"]))
        PushService.received.append((self.path, {k.lower(): v for k, v in self.headers.items()}, body))
        self.answer(
            410 if self.path in PushService.gone else 201,
            None,
            [("Location", f"{self.path}/m{len(PushService.received)}")],
        )


def test_web_push_encrypts_for_the_subscription_and_signs_with_vapid(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    import http_ece
    import jwt
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from py_vapid import Vapid02, b64urlencode

    from nudgeflow.channels.providers import WebPushProvider, WebPushSettings

    base, stop = start(PushService)
    monkeypatch.setenv("NUDGEFLOW_OUTBOUND_ALLOW_NETWORKS", "127.0.0.1/32")
    vapid = Vapid02()
    vapid.generate_keys()
    browser = ec.generate_private_key(ec.SECP256R1())  # the browser's subscription key pair
    auth = os.urandom(16)
    public = browser.public_key().public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
    )

    def subscription(path: str) -> str:
        return json.dumps(
            {"endpoint": f"{base}{path}", "keys": {"p256dh": b64urlencode(public), "auth": b64urlencode(auth)}}
        )

    PushService.gone = {"/push/gone"}
    provider = WebPushProvider(
        WebPushSettings(vapid_private_key=vapid.private_pem().decode(), subject="mailto:ops@shop.example")  # type: ignore[arg-type]
    )
    try:
        r = SendRequest(
            "key-3",
            "webpush",
            "u1",
            "j",
            1,
            "s",
            1,
            None,
            {"title": "Back in stock", "url": "/p/1"},
            {},
            5,
            None,
            None,
            subscription("/push/abc"),
            None,
        )

        async def go() -> list[Any]:
            out: list[Any] = [await provider.deliver(r)]
            for to in (subscription("/push/gone"), None):
                try:
                    await provider.deliver(req("webpush", to, title="x"))
                except Unreachable as e:
                    out.append(e.reason)
            return out

        assert asyncio.run(go()) == ["/push/abc/m1", "HTTP 410", "no web push subscription"]
        path, headers, body = PushService.received[0]
        assert path == "/push/abc" and headers["content-encoding"] == "aes128gcm" and headers["ttl"] == "86400"
        scheme, _, params = headers["authorization"].partition(" ")
        token = dict(p.split("=", 1) for p in params.split(","))["t"]
        claims = jwt.decode(token, vapid.public_key, algorithms=["ES256"], audience=base)
        assert scheme == "vapid" and claims["sub"] == "mailto:ops@shop.example"
        payload = json.loads(http_ece.decrypt(body, private_key=browser, auth_secret=auth, version="aes128gcm"))
        assert payload == {"title": "Back in stock", "url": "/p/1", "data": {}, "key": "key-3"}
    finally:
        stop()


# --- APNs over HTTP/2 ----------------------------------------------------------------------------


def self_signed(tmp: Any) -> tuple[str, str]:
    """A certificate for 127.0.0.1 (its own CA), and its key: paths."""
    import datetime as dt
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
        .sign(key, hashes.SHA256())
    )
    (tmp / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (tmp / "key.pem").write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return str(tmp / "cert.pem"), str(tmp / "key.pem")


def test_apns_sends_over_http2_with_a_provider_token_and_classifies_reasons(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Any
) -> None:
    import jwt
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from hypercorn.asyncio import serve
    from hypercorn.config import Config

    from nudgeflow.channels.providers import ApnsProvider, ApnsSettings

    seen: list[tuple[str, str, dict[str, str], dict[str, Any]]] = []
    answers = {
        "dead": (410, {"reason": "Unregistered"}),
        "busy": (503, {"reason": "ServiceUnavailable"}),
        "bad": (400, {"reason": "PayloadEmpty"}),
    }

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        body = b""
        while True:
            msg = await receive()
            body += msg.get("body", b"")
            if not msg.get("more_body"):
                break
        headers = {k.decode(): v.decode() for k, v in scope["headers"]}
        seen.append((scope["http_version"], scope["path"], headers, json.loads(body)))
        token = scope["path"].rsplit("/", 1)[1]
        status, doc = answers.get(token, (200, None))
        out = [(b"apns-id", b"A1B2")] if status == 200 else [(b"content-type", b"application/json")]
        await send({"type": "http.response.start", "status": status, "headers": out})
        await send({"type": "http.response.body", "body": json.dumps(doc).encode() if doc else b""})

    cert, key = self_signed(tmp_path)
    port = free_port()
    config = Config()
    config.bind = [f"127.0.0.1:{port}"]
    config.certfile, config.keyfile = cert, key
    stop = threading.Event()
    loop = asyncio.new_event_loop()
    thread = threading.Thread(
        target=lambda: loop.run_until_complete(
            serve(app, config, shutdown_trigger=lambda: loop.run_in_executor(None, stop.wait))  # type: ignore[arg-type]
        ),
        daemon=True,
    )
    thread.start()
    monkeypatch.setenv("NUDGEFLOW_OUTBOUND_ALLOW_NETWORKS", "127.0.0.1/32")
    signing = ec.generate_private_key(ec.SECP256R1())
    p8 = signing.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    provider = ApnsProvider(
        ApnsSettings(
            team_id="TEAM123",
            key_id="KEY456",
            private_key=p8.decode(),
            topic="com.shop.app",  # type: ignore[arg-type]
            base_url=f"https://127.0.0.1:{port}",
            ca_file=cert,
        )
    )
    try:
        r = SendRequest(
            "key-7",
            "push",
            "u1",
            "j",
            1,
            "s",
            1,
            None,
            {"title": "Hi", "body": "Your cart"},
            {"cart": 7},
            5,
            None,
            None,
            "abcd1234",
            1767225600000,
        )

        async def go() -> list[Any]:
            for _ in range(50):  # the server thread may still be binding
                try:
                    out: list[Any] = [await provider.deliver(r)]
                    break
                except Transient:
                    await asyncio.sleep(0.1)
            for token in ("dead", "busy", "bad"):
                try:
                    await provider.deliver(req("push", token, title="x"))
                except (Unreachable, Transient, Permanent) as e:
                    out.append(type(e).__name__)
            await provider.close()
            return out

        assert asyncio.run(go()) == ["A1B2", "Unreachable", "Transient", "Permanent"]
        version, path, headers, body = seen[0]
        assert version == "2" and path == "/3/device/abcd1234"
        assert headers["apns-topic"] == "com.shop.app" and headers["apns-push-type"] == "alert"
        assert headers["apns-expiration"] == "1767225600" and headers["apns-collapse-id"] == "key-7"
        token = headers["authorization"].removeprefix("bearer ")
        assert jwt.get_unverified_header(token)["kid"] == "KEY456"
        assert jwt.decode(token, signing.public_key(), algorithms=["ES256"])["iss"] == "TEAM123"
        assert body == {"cart": 7, "aps": {"alert": {"title": "Hi", "body": "Your cart"}}, "nudgeflow_key": "key-7"}
    finally:
        stop.set()
        thread.join(10)
