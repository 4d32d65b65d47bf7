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

import hashlib
import hmac
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol, TextIO, TypeVar

import httpx
import orjson
from pydantic import SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from nudgeflow.channels.outbound import Answer, Outbound, OutboundPolicy, Refused
from nudgeflow.engine.errors import ConfigError, NudgeflowError
from nudgeflow.engine.io import SendRequest
from nudgeflow.engine.schema import CHANNELS
from nudgeflow.streams.wire import send_request_doc

R = TypeVar("R")


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


def http_outcome(resp: httpx.Response | Answer, unreachable: tuple[int, ...] = (404, 410)) -> None:
    """The usual meaning of an HTTP answer: 2xx delivered, 429 and 5xx transient, the given
    statuses unreachable, any other 4xx (and an unfollowed redirect) permanent."""
    code = resp.status if isinstance(resp, Answer) else resp.status_code
    if 200 <= code < 300:
        return
    if code == 429 or code >= 500:
        retry_after = resp.headers.get("retry-after")
        raise Transient(f"HTTP {code}", float(retry_after) if retry_after and retry_after.isdigit() else None)
    if code in unreachable:
        raise Unreachable(f"HTTP {code}")
    raise Permanent(f"HTTP {code}")


async def http_call(send: Callable[[], Awaitable[R]]) -> R:
    """Run an HTTP request; transport failures are transient, a refusal by the outbound policy is
    permanent (the configuration, not the moment, is wrong)."""
    try:
        return await send()
    except httpx.TimeoutException:
        raise Transient("timeout") from None
    except httpx.TransportError as e:
        raise Transient(type(e).__name__) from None
    except Refused as e:
        raise Permanent(f"outbound policy: {e.reason}") from None


def outbound(kind: str, max_bytes: int = 64 * 1024) -> Outbound:
    """An HTTP client under the outbound policy of the environment's settings
    (NUDGEFLOW_OUTBOUND_ALLOW_HOSTS / _NETWORKS), for providers that call HTTP APIs."""
    from nudgeflow.settings import Settings

    s = Settings(**{})  # the environment's (flags are the sender's own)
    return Outbound(OutboundPolicy(s.outbound_allow_hosts, s.outbound_allow_networks), max_bytes, kind=kind)


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


class WebhookProvider:
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
        resp = await http_call(
            lambda: self.http.request("POST", self.s.url, content=body, headers=headers, timeout=self.s.timeout_s)
        )
        http_outcome(resp)
        request_id: str | None = resp.headers.get("x-request-id")
        return request_id

    async def close(self) -> None:
        await self.http.aclose()


@register("webhook", WebhookSettings)
def _webhook(channel: str, settings: Any) -> Provider:
    return WebhookProvider(settings)
