"""Delivery providers and their registry: `nudgeflow send --provider NAME` picks one from `PROVIDERS`.

A provider delivers one send request, or tells why not, by the class of what it raises:

    (returns)            delivered (the provider's message id, if it gives one)
    Unreachable          the recipient cannot be reached on this channel (hard bounce, invalid
                         token, unsubscribed number): reported as feedback, the fallback is sent
    Transient            try again later (5xx, 429, timeouts, connection errors); after the
                         sender's last retry the request goes to the send dead-letter topic
    Permanent            never deliverable as it is (4xx, a malformed address): dead-lettered now

`idempotent` says whether the provider honours the request's idempotency key (it passes it to an
API that deduplicates by it): only then does a sender that crashed mid-delivery deliver again.

Adding a provider: a class with `deliver`, `close`, `name` and `idempotent`, a settings class
(pydantic-settings, env prefix `NUDGEFLOW_<NAME>_`; secrets only from the environment), and a
`@register("name", settings, channels)` factory.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from email.message import EmailMessage
from pathlib import Path
from typing import Any, Protocol, TextIO
from urllib.parse import urlencode, urlsplit

import aiosmtplib
import httpx
import jwt
import orjson
from py_vapid import Vapid02
from pydantic import SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict
from pywebpush import WebPusher

from nudgeflow.channels.outbound import Answer, Outbound, OutboundPolicy, Refused
from nudgeflow.engine.errors import ConfigError, NudgeflowError
from nudgeflow.engine.io import SendRequest
from nudgeflow.engine.schema import CHANNELS
from nudgeflow.streams.wire import send_request_doc


class ProviderError(NudgeflowError):
    """Why a request was not delivered; `reason` is short and has no personal data."""

    def __init__(self, reason: str, retry_after: float | None = None) -> None:
        super().__init__(reason)
        self.reason, self.retry_after = reason, retry_after


class Unreachable(ProviderError):
    """The user cannot be reached on this channel (no address, bounced, opted out)."""


class Transient(ProviderError):
    """Worth another try later."""


class Permanent(ProviderError):
    """Not deliverable as it is: to the send dead-letter topic."""


class UnknownProvider(ConfigError):
    def __init__(self, name: str) -> None:
        super().__init__(f"unknown provider '{name}'; available: {', '.join(sorted(PROVIDERS))}")


class Provider(Protocol):
    name: str
    idempotent: bool

    async def deliver(self, req: SendRequest) -> str | None: ...

    async def close(self) -> None: ...


@dataclass(frozen=True)
class Registered:
    factory: Callable[[str, Any], Provider]  # (channel, settings) -> provider
    settings: type[BaseSettings] | None
    channels: tuple[str, ...]


PROVIDERS: dict[str, Registered] = {}


def register(
    name: str, settings: type[BaseSettings] | None = None, channels: tuple[str, ...] = CHANNELS
) -> Callable[[Callable[[str, Any], Provider]], Callable[[str, Any], Provider]]:
    def add(factory: Callable[[str, Any], Provider]) -> Callable[[str, Any], Provider]:
        PROVIDERS[name] = Registered(factory, settings, channels)
        return factory

    return add


def make_provider(name: str, channel: str) -> Provider:
    """The provider `name` for `channel`, its settings read from the environment."""
    reg = PROVIDERS.get(name)
    if reg is None:
        raise UnknownProvider(name)
    if channel not in reg.channels:
        raise ConfigError(f"provider '{name}' sends {', '.join(reg.channels)}, not {channel}")
    settings = None
    if reg.settings is not None:
        from pydantic import ValidationError

        try:
            settings = reg.settings()
        except ValidationError as e:
            fields = ", ".join(
                f"{reg.settings.model_config.get('env_prefix', '')}{'.'.join(map(str, x['loc'])).upper()}"
                for x in e.errors()
            )
            raise ConfigError(f"provider '{name}' needs settings: {fields}") from None
    return reg.factory(channel, settings)


def http_outcome(resp: Answer, unreachable: tuple[int, ...] = (404, 410)) -> None:
    """The usual meaning of an HTTP answer: 2xx delivered, 429 and 5xx transient, the given
    statuses unreachable, any other 4xx (and an unfollowed redirect) permanent."""
    code = resp.status
    if 200 <= code < 300:
        return
    if code == 429 or code >= 500:
        retry_after = resp.headers.get("retry-after")
        raise Transient(f"HTTP {code}", float(retry_after) if retry_after and retry_after.isdigit() else None)
    if code in unreachable:
        raise Unreachable(f"HTTP {code}")
    raise Permanent(f"HTTP {code}")


async def post(http: Outbound, url: str, content: bytes, headers: dict[str, str], timeout: float) -> Answer:
    """POST through the outbound policy; transport failures are transient, a refusal by the policy
    is permanent (the configuration, not the moment, is wrong)."""
    try:
        return await http.request("POST", url, content=content, headers=headers, timeout=timeout)
    except httpx.TimeoutException:
        raise Transient("timeout") from None
    except httpx.TransportError as e:
        raise Transient(type(e).__name__) from None
    except Refused as e:
        raise Permanent(f"outbound policy: {e.reason}") from None


def outbound(kind: str, max_bytes: int = 64 * 1024, client: httpx.AsyncClient | None = None) -> Outbound:
    """An HTTP client under the outbound policy of the environment's settings
    (NUDGEFLOW_OUTBOUND_ALLOW_HOSTS / _NETWORKS), for providers that call HTTP APIs."""
    from nudgeflow.settings import Settings

    s = Settings(**{})  # the environment's (flags are the sender's own)
    policy = OutboundPolicy(s.outbound_allow_hosts, s.outbound_allow_networks)
    return Outbound(policy, max_bytes, client=client, kind=kind)


def json_object(body: bytes) -> dict[str, Any]:
    """An API answer's JSON object; {} when the body is empty, not JSON or not an object."""
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError:
        return {}
    return doc if isinstance(doc, dict) else {}


def error_code(value: Any) -> int:
    """An API's numeric error code, or 0."""
    try:
        return int(value)
    except (TypeError, ValueError):
        return 0


class HttpProvider:
    """What the providers that call an HTTP API share: their outbound client."""

    http: Outbound

    async def close(self) -> None:
        await self.http.aclose()


# --- console ---------------------------------------------------------------------------------


class ConsoleProvider:
    """Prints each request on one line: the demo's stand-in for a real push/SMS/email gateway."""

    name, idempotent = "console", False

    def __init__(self, out: TextIO = sys.stdout) -> None:
        self.out = out

    async def deliver(self, req: SendRequest) -> str | None:
        text = req.content.get("title") or req.content.get("subject") or req.content.get("text") or req.template
        self.out.write(
            f"[{req.channel}] user={req.user_id} journey={req.journey}/{req.step} key={req.key[:12]} :: {text}\n"
        )
        self.out.flush()
        return None

    async def close(self) -> None:
        return None


@register("console")
def _console(channel: str, settings: Any) -> Provider:
    return ConsoleProvider()


# --- webhook ---------------------------------------------------------------------------------


class WebhookSettings(BaseSettings):
    """A generic signed HTTP POST of the send request to your endpoint."""

    model_config = SettingsConfigDict(env_prefix="NUDGEFLOW_WEBHOOK_", extra="ignore")

    url: str
    secret: SecretStr | None = None  # HMAC-SHA256 key for the signature header
    timeout_s: float = 10.0


def webhook_signature(secret: bytes, timestamp: str, body: bytes) -> str:
    """`v1=` + hex HMAC-SHA256 of "<timestamp>.<body>" (the receiver recomputes and compares, and
    rejects timestamps older than a few minutes: no replays)."""
    return "v1=" + hmac.new(secret, timestamp.encode() + b"." + body, hashlib.sha256).hexdigest()


class WebhookProvider(HttpProvider):
    """POSTs the send request (the JSON contract, see README "Send requests") to one URL with
    headers `Idempotency-Key`, `X-Nudgeflow-Timestamp` and, with a secret,
    `X-Nudgeflow-Signature`. 2xx delivered; 404/410 unreachable; 429/5xx/timeouts retried;
    other 4xx dead-lettered."""

    name, idempotent = "webhook", True

    def __init__(self, settings: WebhookSettings) -> None:
        self.s = settings
        self.http = outbound("webhook")

    async def deliver(self, req: SendRequest) -> str | None:
        body = orjson.dumps(send_request_doc(req))
        ts = str(int(time.time()))
        headers = {"content-type": "application/json", "idempotency-key": req.key, "x-nudgeflow-timestamp": ts}
        if self.s.secret is not None:
            headers["x-nudgeflow-signature"] = webhook_signature(self.s.secret.get_secret_value().encode(), ts, body)
        resp = await post(self.http, self.s.url, body, headers, self.s.timeout_s)
        http_outcome(resp)
        request_id: str | None = resp.headers.get("x-request-id")
        return request_id


@register("webhook", WebhookSettings)
def _webhook(channel: str, settings: Any) -> Provider:
    return WebhookProvider(settings)


# --- email: SMTP -----------------------------------------------------------------------------


class SmtpSettings(BaseSettings):
    """Email over SMTP (submission port with STARTTLS by default)."""

    model_config = SettingsConfigDict(env_prefix="NUDGEFLOW_SMTP_", extra="ignore")

    host: str
    port: int = 587
    sender: str  # the From address
    username: str | None = None
    password: SecretStr | None = None
    starttls: bool = True  # upgrade the connection (port 587); use_tls for implicit TLS (port 465)
    use_tls: bool = False
    timeout_s: float = 30.0


class SmtpProvider:
    """One message per request: `subject` (else `title`), a text part (`text`, else `body`) and an
    HTML alternative (`html`). `Message-ID` is derived from the idempotency key, so a receiving
    system that deduplicates by it sees one message. Answers: a 5xx refusal of the recipient is a
    hard bounce (unreachable); 4xx and connection failures are transient; other 5xx permanent."""

    name, idempotent = "smtp", False

    def __init__(self, settings: SmtpSettings) -> None:
        self.s = settings

    def message(self, req: SendRequest) -> EmailMessage:
        if not req.to:
            raise Unreachable("no email address")
        c = req.content
        msg = EmailMessage()
        msg["From"], msg["To"] = self.s.sender, req.to
        msg["Subject"] = c.get("subject") or c.get("title") or ""
        msg["Message-ID"] = f"<{req.key}@nudgeflow>"
        msg.set_content(c.get("text") or c.get("body") or "")
        if c.get("html"):
            msg.add_alternative(c["html"], subtype="html")
        return msg

    async def deliver(self, req: SendRequest) -> str | None:
        msg = self.message(req)
        s = self.s
        try:
            await aiosmtplib.send(
                msg,
                hostname=s.host,
                port=s.port,
                username=s.username,
                password=s.password.get_secret_value() if s.password else None,
                start_tls=s.starttls and not s.use_tls,
                use_tls=s.use_tls,
                timeout=s.timeout_s,
            )
        except aiosmtplib.SMTPRecipientsRefused as e:
            codes = [r.code for r in e.recipients]
            if any(500 <= c < 600 for c in codes):
                raise Unreachable(f"SMTP {codes[0]}: recipient refused") from None
            raise Transient(f"SMTP {codes[0] if codes else '?'}") from None
        except aiosmtplib.SMTPResponseException as e:
            if 400 <= e.code < 500:
                raise Transient(f"SMTP {e.code}") from None
            raise Permanent(f"SMTP {e.code}") from None
        except (aiosmtplib.SMTPException, OSError, TimeoutError) as e:
            raise Transient(type(e).__name__) from None
        return str(msg["Message-ID"])

    async def close(self) -> None:
        return None


@register("smtp", SmtpSettings, channels=("email",))
def _smtp(channel: str, settings: Any) -> Provider:
    return SmtpProvider(settings)


# --- sms: the Twilio Messages API ------------------------------------------------------------


class TwilioSettings(BaseSettings):
    """SMS (and WhatsApp, with whatsapp: numbers) through the Twilio Messages API, or any gateway
    that speaks its shape."""

    model_config = SettingsConfigDict(env_prefix="NUDGEFLOW_TWILIO_", extra="ignore")

    account_sid: str
    auth_token: SecretStr
    from_number: str
    base_url: str = "https://api.twilio.com"
    timeout_s: float = 15.0


TWILIO_UNREACHABLE = {21211, 21214, 21408, 21610, 21612, 21614, 63003}  # invalid, landline, opted out, ...


class TwilioProvider(HttpProvider):
    """POST /2010-04-01/Accounts/{sid}/Messages.json, form fields To, From, Body, HTTP basic auth.
    201 delivered (the message sid); 400 with an error code for a number that cannot receive
    (invalid, not mobile, unsubscribed) unreachable; 429 and 5xx transient; other 4xx permanent."""

    name, idempotent = "twilio", False

    def __init__(self, settings: TwilioSettings, channel: str) -> None:
        self.s, self.channel = settings, channel
        self.http = outbound(channel)
        token = f"{settings.account_sid}:{settings.auth_token.get_secret_value()}".encode()
        self.auth = "Basic " + base64.b64encode(token).decode()
        self.url = f"{settings.base_url.rstrip('/')}/2010-04-01/Accounts/{settings.account_sid}/Messages.json"

    async def deliver(self, req: SendRequest) -> str | None:
        if not req.to:
            raise Unreachable("no phone number")
        c = req.content
        prefix = "whatsapp:" if self.channel == "whatsapp" else ""
        form = {
            "To": prefix + req.to,
            "From": prefix + self.s.from_number,
            "Body": c.get("text") or c.get("body") or c.get("title") or "",
        }
        headers = {"authorization": self.auth, "content-type": "application/x-www-form-urlencoded"}
        resp = await post(self.http, self.url, urlencode(form).encode(), headers, self.s.timeout_s)
        if resp.status == 400:
            code = error_code(json_object(resp.body).get("code"))
            if code in TWILIO_UNREACHABLE:
                raise Unreachable(f"Twilio {code}")
            raise Permanent(f"Twilio {code or 400}")
        http_outcome(resp)
        sid = json_object(resp.body).get("sid")
        return sid if isinstance(sid, str) else None


@register("twilio", TwilioSettings, channels=("sms", "whatsapp"))
def _twilio(channel: str, settings: Any) -> Provider:
    return TwilioProvider(settings, channel)


# --- whatsapp: the WhatsApp Cloud API ----------------------------------------------------------


class WhatsAppSettings(BaseSettings):
    """WhatsApp Business messages through Meta's Cloud API (Graph API)."""

    model_config = SettingsConfigDict(env_prefix="NUDGEFLOW_WHATSAPP_", extra="ignore")

    phone_number_id: str
    access_token: SecretStr
    base_url: str = "https://graph.facebook.com/v21.0"
    language: str = "en"  # the template language code when the request's data has none
    timeout_s: float = 15.0


WHATSAPP_UNREACHABLE = {131026, 131050, 131021}  # undeliverable, user stopped marketing, not a WhatsApp user
WHATSAPP_TRANSIENT = {4, 80007, 130429, 131048, 131056}  # rate limits and spam throttling


class WhatsAppProvider(HttpProvider):
    """POST {base}/{phone_number_id}/messages with a bearer token. A request with a `template` id
    sends that approved template message (`data.language`, `data.params`: the body parameters);
    without one, a text message (`text`/`body`; WhatsApp delivers those only within 24 h of the
    user's last message). Error codes for undeliverable numbers and opted-out users are
    unreachable; rate limits and 5xx transient; other 4xx permanent."""

    name, idempotent = "whatsapp", False

    def __init__(self, settings: WhatsAppSettings) -> None:
        self.s = settings
        self.http = outbound("whatsapp")
        self.url = f"{settings.base_url.rstrip('/')}/{settings.phone_number_id}/messages"

    def body(self, req: SendRequest) -> dict[str, Any]:
        if not req.to:
            raise Unreachable("no phone number")
        to = req.to.removeprefix("+")
        if req.template:
            params = req.data.get("params") or []
            template: dict[str, Any] = {
                "name": req.template,
                "language": {"code": str(req.data.get("language") or self.s.language)},
            }
            if params:
                template["components"] = [
                    {"type": "body", "parameters": [{"type": "text", "text": str(p)} for p in params]}
                ]
            return {"messaging_product": "whatsapp", "to": to, "type": "template", "template": template}
        text = req.content.get("text") or req.content.get("body") or req.content.get("title") or ""
        return {"messaging_product": "whatsapp", "to": to, "type": "text", "text": {"body": text}}

    async def deliver(self, req: SendRequest) -> str | None:
        doc = self.body(req)
        headers = {
            "authorization": f"Bearer {self.s.access_token.get_secret_value()}",
            "content-type": "application/json",
        }
        resp = await post(self.http, self.url, orjson.dumps(doc), headers, self.s.timeout_s)
        if 400 <= resp.status < 500:
            error = json_object(resp.body).get("error")
            code = error_code(error.get("code") if isinstance(error, dict) else None)
            if code in WHATSAPP_UNREACHABLE:
                raise Unreachable(f"WhatsApp {code}")
            if code in WHATSAPP_TRANSIENT or resp.status == 429:
                raise Transient(f"WhatsApp {code or resp.status}")
            raise Permanent(f"WhatsApp {code or resp.status}")
        http_outcome(resp)
        messages = json_object(resp.body).get("messages")
        first = messages[0] if isinstance(messages, list) and messages else None
        mid = first.get("id") if isinstance(first, dict) else None
        return mid if isinstance(mid, str) else None


@register("whatsapp", WhatsAppSettings, channels=("whatsapp",))
def _whatsapp(channel: str, settings: Any) -> Provider:
    return WhatsAppProvider(settings)


# --- push: Firebase Cloud Messaging HTTP v1 ----------------------------------------------------


class FcmSettings(BaseSettings):
    """Push through FCM HTTP v1, authorised with a Google service account key file."""

    model_config = SettingsConfigDict(env_prefix="NUDGEFLOW_FCM_", extra="ignore")

    service_account_file: Path  # the JSON key of a service account with the Firebase Messaging role
    project_id: str | None = None  # default: the key file's project_id
    base_url: str = "https://fcm.googleapis.com"
    timeout_s: float = 10.0


FCM_SCOPE = "https://www.googleapis.com/auth/firebase.messaging"


class FcmProvider(HttpProvider):
    """POST {base}/v1/projects/{project}/messages:send with an OAuth bearer token, which it gets
    (and renews before it expires) by signing a JWT assertion with the service account's key and
    exchanging it at the key's token_uri. The message carries `notification` (title, body, image)
    and `data` (the request's data as text, plus `nudgeflow_key`). 404 and `UNREGISTERED` (an
    uninstalled app, a stale token) are unreachable; 429 and 5xx transient; 401 renews the token
    and retries; other 4xx permanent."""

    name, idempotent = "fcm", False

    def __init__(self, settings: FcmSettings) -> None:
        try:
            key = orjson.loads(settings.service_account_file.read_bytes())
            self.email, self.private_key, self.token_uri = key["client_email"], key["private_key"], key["token_uri"]
        except (OSError, orjson.JSONDecodeError, KeyError) as e:
            raise ConfigError(
                f"NUDGEFLOW_FCM_SERVICE_ACCOUNT_FILE: not a service account key ({type(e).__name__})"
            ) from None
        project = settings.project_id or key.get("project_id")
        if not project:
            raise ConfigError("NUDGEFLOW_FCM_PROJECT_ID: not set and not in the key file")
        self.s = settings
        self.http = outbound("push")
        self.url = f"{settings.base_url.rstrip('/')}/v1/projects/{project}/messages:send"
        self._token: str | None = None
        self._token_until = 0.0

    async def token(self) -> str:
        if self._token is not None and time.time() < self._token_until - 60:
            return self._token
        now = int(time.time())
        claims = {"iss": self.email, "scope": FCM_SCOPE, "aud": self.token_uri, "iat": now, "exp": now + 3600}
        assertion = jwt.encode(claims, self.private_key, algorithm="RS256")
        form = urlencode({"grant_type": "urn:ietf:params:oauth:grant-type:jwt-bearer", "assertion": assertion})
        headers = {"content-type": "application/x-www-form-urlencoded"}
        resp = await post(self.http, self.token_uri, form.encode(), headers, self.s.timeout_s)
        if resp.status != 200:
            if resp.status >= 500 or resp.status == 429:
                raise Transient(f"FCM token {resp.status}")
            raise Permanent(f"FCM token {resp.status}: the service account was refused")
        doc = orjson.loads(resp.body)
        self._token, self._token_until = str(doc["access_token"]), now + float(doc.get("expires_in", 3600))
        return self._token

    def body(self, req: SendRequest) -> dict[str, Any]:
        if not req.to:
            raise Unreachable("no push token")
        c = req.content
        notification = {k: c[f] for k, f in (("title", "title"), ("body", "body"), ("image", "image")) if c.get(f)}
        data = {str(k): v if isinstance(v, str) else orjson.dumps(v).decode() for k, v in req.data.items()}
        message: dict[str, Any] = {"token": req.to, "data": {**data, "nudgeflow_key": req.key}}
        if notification:
            message["notification"] = notification
        return {"message": message}

    async def deliver(self, req: SendRequest) -> str | None:
        doc = orjson.dumps(self.body(req))
        for _ in range(2):  # a 401: the token was revoked or expired early, renew it once
            headers = {"authorization": f"Bearer {await self.token()}", "content-type": "application/json"}
            resp = await post(self.http, self.url, doc, headers, self.s.timeout_s)
            if resp.status != 401:
                break
            self._token = None
        else:
            raise Permanent("FCM 401: the service account is not authorised")
        if resp.status == 404 or b"UNREGISTERED" in resp.body:
            raise Unreachable(f"FCM {resp.status} UNREGISTERED")
        http_outcome(resp)
        name = json_object(resp.body).get("name")
        return name if isinstance(name, str) else None


@register("fcm", FcmSettings, channels=("push",))
def _fcm(channel: str, settings: Any) -> Provider:
    return FcmProvider(settings)


# --- webpush: VAPID Web Push ---------------------------------------------------------------------


class WebPushSettings(BaseSettings):
    """Browser push (RFC 8030 push services: FCM for Chrome, Mozilla's autopush, Apple's) with VAPID."""

    model_config = SettingsConfigDict(env_prefix="NUDGEFLOW_WEBPUSH_", extra="ignore")

    vapid_private_key: SecretStr  # PEM, or the base64url raw/DER form `vapid --gen` prints
    subject: str  # mailto: or https: contact the push services may use
    ttl_s: int = 86400  # how long the push service keeps it for an offline browser
    timeout_s: float = 10.0


class WebPushProvider(HttpProvider):
    """The request's `to` is the browser's PushSubscription (JSON: endpoint, keys.p256dh,
    keys.auth). The payload (JSON: title, body, url, image, data, key) is encrypted for it
    (aes128gcm, RFC 8291) and POSTed to its endpoint with a VAPID `Authorization` (RFC 8292),
    `TTL` and `Topic` headers, through the outbound policy. 201 delivered; 404/410 (the
    subscription is gone) unreachable; 429 and 5xx transient; other 4xx permanent."""

    name, idempotent = "webpush", False

    def __init__(self, settings: WebPushSettings) -> None:
        self.s = settings
        key = settings.vapid_private_key.get_secret_value().strip()
        try:
            self.vapid = Vapid02.from_pem(key.encode()) if key.startswith("-----") else Vapid02.from_string(key)
        except Exception as e:  # py_vapid raises several kinds for a bad key
            raise ConfigError(f"NUDGEFLOW_WEBPUSH_VAPID_PRIVATE_KEY: not a VAPID key ({type(e).__name__})") from None
        self.http = outbound("webpush")

    async def deliver(self, req: SendRequest) -> str | None:
        try:
            sub = orjson.loads(req.to or "")
            endpoint, keys = str(sub["endpoint"]), sub["keys"]
            keys["p256dh"], keys["auth"]
        except (orjson.JSONDecodeError, KeyError, TypeError):
            raise Unreachable("no web push subscription") from None
        c = req.content
        payload: dict[str, Any] = {k: c[k] for k in ("title", "body", "url", "image") if c.get(k)}
        payload.update(data=dict(req.data), key=req.key)
        try:
            body = WebPusher(sub).encode(orjson.dumps(payload), "aes128gcm")["body"]
        except Exception:  # a malformed key in the subscription
            raise Unreachable("the subscription's keys cannot be used") from None
        u = urlsplit(endpoint)
        claims = {"sub": self.s.subject, "aud": f"{u.scheme}://{u.netloc}", "exp": int(time.time()) + 12 * 3600}
        headers = {
            **self.vapid.sign(claims),
            "content-encoding": "aes128gcm",
            "content-type": "application/octet-stream",
            "ttl": str(self.s.ttl_s),
            "topic": req.key[:32],  # a retry replaces, not adds to, a message still queued
            "urgency": "normal",
        }
        resp = await post(self.http, endpoint, body, headers, self.s.timeout_s)
        http_outcome(resp)
        location: str | None = resp.headers.get("location")
        return location


@register("webpush", WebPushSettings, channels=("webpush",))
def _webpush(channel: str, settings: Any) -> Provider:
    return WebPushProvider(settings)


# --- push: Apple Push Notification service --------------------------------------------------------


class ApnsSettings(BaseSettings):
    """iOS push through APNs over HTTP/2 with token (.p8 key) authentication."""

    model_config = SettingsConfigDict(env_prefix="NUDGEFLOW_APNS_", extra="ignore")

    team_id: str
    key_id: str
    private_key: SecretStr  # the .p8 key's PEM text
    topic: str  # the app's bundle id
    base_url: str = "https://api.push.apple.com"  # https://api.sandbox.push.apple.com for development
    ca_file: Path | None = None  # trust this CA instead of the system's (a TLS-inspecting proxy, tests)
    timeout_s: float = 10.0


APNS_UNREACHABLE = {"BadDeviceToken", "Unregistered", "DeviceTokenNotForTopic"}


class ApnsProvider(HttpProvider):
    """POST /3/device/<token> over HTTP/2 with `authorization: bearer <ES256 JWT>` (renewed every
    50 minutes, as APNs asks), `apns-topic`, `apns-push-type: alert`, `apns-expiration` from the
    request's expiry and `apns-collapse-id` from its key; body `{"aps": {"alert": {title, body}},
    "nudgeflow_key", ...data}`. 200 delivered (apns-id); BadDeviceToken, Unregistered and
    DeviceTokenNotForTopic unreachable; an expired or refused provider token is renewed once;
    429 and 5xx transient; other 4xx permanent."""

    name, idempotent = "apns", False

    def __init__(self, settings: ApnsSettings) -> None:
        self.s = settings
        verify: Any = str(settings.ca_file) if settings.ca_file else True
        client = httpx.AsyncClient(http2=True, follow_redirects=False, trust_env=False, verify=verify)
        self.http = outbound("push", client=client)
        self._token: str | None = None
        self._token_at = 0.0

    def token(self) -> str:
        if self._token is None or time.time() - self._token_at > 50 * 60:
            self._token_at = time.time()
            self._token = jwt.encode(
                {"iss": self.s.team_id, "iat": int(self._token_at)},
                self.s.private_key.get_secret_value(),
                algorithm="ES256",
                headers={"kid": self.s.key_id},
            )
        return self._token

    async def deliver(self, req: SendRequest) -> str | None:
        if not req.to:
            raise Unreachable("no device token")
        c = req.content
        alert = {k: c[k] for k in ("title", "body") if c.get(k)}
        doc = orjson.dumps({**req.data, "aps": {"alert": alert}, "nudgeflow_key": req.key})
        url = f"{self.s.base_url.rstrip('/')}/3/device/{req.to}"
        for _ in range(2):
            headers = {
                "authorization": f"bearer {self.token()}",
                "apns-topic": self.s.topic,
                "apns-push-type": "alert",
                "apns-collapse-id": req.key[:64],
                "apns-expiration": str((req.expires_at or 0) // 1000),
                "content-type": "application/json",
            }
            resp = await post(self.http, url, doc, headers, self.s.timeout_s)
            reason = str(json_object(resp.body).get("reason", ""))
            if resp.status == 403 and reason in ("ExpiredProviderToken", "InvalidProviderToken"):
                self._token = None  # renew once
                continue
            break
        if reason in APNS_UNREACHABLE or resp.status == 410:
            raise Unreachable(f"APNs {resp.status} {reason}")
        http_outcome(resp)
        apns_id: str | None = resp.headers.get("apns-id")
        return apns_id


@register("apns", ApnsSettings, channels=("push",))
def _apns(channel: str, settings: Any) -> Provider:
    return ApnsProvider(settings)
