"""Outbound HTTP under a policy: what `call` steps and the webhook provider may reach, and how much
they may read back.

Journey authors fix a call's scheme and host (`validate` rejects a templated host), but the rest of
the URL, the headers and the body are filled with event and profile data that end users control,
and a call request arrives over Kafka. So every request, and every redirect it is sent on, passes
the same checks here before a connection is opened:

- the host is on the allowlist (`NUDGEFLOW_OUTBOUND_ALLOW_HOSTS`; empty: any host);
- the host is resolved once, here, and *every* address it resolves to must be public (not
  loopback, private, link-local such as the cloud metadata address 169.254.169.254, shared,
  multicast, reserved or unspecified; IPv4-mapped IPv6 is checked as IPv4) unless it lies in
  `NUDGEFLOW_OUTBOUND_ALLOW_NETWORKS`;
- the connection goes to that checked address (the URL's host is kept for the Host header and for
  TLS: SNI and certificate checks), so a second DNS answer cannot swap in another address;
- at most `max_redirects` redirects, each checked again;
- the answer is read up to `max_bytes` and no further (`TooLarge`): an API cannot fill the user's
  state or a feedback message.

Refusals and cut answers are counted in `nudgeflow_outbound_refused_total{reason}`.
"""

from __future__ import annotations

import asyncio
import ipaddress
import re
import socket
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import httpx

from nudgeflow.channels import metrics
from nudgeflow.engine.errors import ConfigError, NudgeflowError

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
REDIRECTS = (301, 302, 303, 307, 308)


class Refused(NudgeflowError):
    """The policy refused the request; `reason` is short and has no personal data."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class TooLarge(Refused):
    """The answer was longer than the cap: what was read is dropped."""


@dataclass(frozen=True, slots=True)
class Answer:
    status: int
    content_type: str
    body: bytes
    headers: httpx.Headers


def _public(ip: Address) -> bool:
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_global and not ip.is_multicast


class OutboundPolicy:
    """Which hosts and addresses outbound requests may reach."""

    def __init__(self, allow_hosts: Sequence[str] = (), allow_networks: Sequence[str] = ()) -> None:
        self.hosts: list[tuple[str, int | None]] = []
        for entry in allow_hosts:
            m = re.fullmatch(r"(\[[0-9a-f:.]+\]|[^:\[\]]+)(?::(\d+))?", entry.strip().lower())
            if m is None:
                raise ConfigError(f"NUDGEFLOW_OUTBOUND_ALLOW_HOSTS: not a host[:port]: {entry!r}")
            self.hosts.append((m[1].strip("[]"), int(m[2]) if m[2] else None))
        try:
            self.networks = [ipaddress.ip_network(n.strip(), strict=False) for n in allow_networks]
        except ValueError as e:
            raise ConfigError(f"NUDGEFLOW_OUTBOUND_ALLOW_NETWORKS: {e}") from None

    def host_allowed(self, host: str, port: int) -> bool:
        if not self.hosts:
            return True
        host = host.lower().rstrip(".").strip("[]")
        for pattern, p in self.hosts:
            if p is not None and p != port:
                continue
            if pattern == host or (pattern.startswith("*.") and host.endswith(pattern[1:])):
                return True
        return False

    def address_allowed(self, ip: Address) -> bool:
        return _public(ip) or any(ip in n for n in self.networks)

    async def resolve(self, host: str, port: int) -> Address:
        """The address to connect to; Refused unless the host and every address it has are allowed."""
        if not self.host_allowed(host, port):
            raise Refused("host_not_allowed")
        try:
            addrs: list[Address] = [ipaddress.ip_address(host.strip("[]"))]
        except ValueError:
            try:
                infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
            except OSError:
                raise Refused("unresolvable") from None
            addrs = [ipaddress.ip_address(str(i[4][0]).split("%", 1)[0]) for i in infos]
        if not addrs:
            raise Refused("unresolvable")
        for ip in addrs:
            if not self.address_allowed(ip):
                raise Refused("address_not_allowed")
        return addrs[0]


class Outbound:
    """An HTTP client that asks the policy before every connection (redirects included) and reads
    at most `max_bytes` of an answer."""

    def __init__(
        self,
        policy: OutboundPolicy,
        max_bytes: int,
        max_redirects: int = 5,
        client: httpx.AsyncClient | None = None,
        kind: str = "call",
    ) -> None:
        self.policy, self.max_bytes, self.max_redirects, self.kind = policy, max_bytes, max_redirects, kind
        self.http = client or httpx.AsyncClient(follow_redirects=False, trust_env=False)

    async def request(
        self,
        method: str,
        url: str,
        *,
        headers: dict[str, str] | None = None,
        json: Any = None,
        content: bytes | None = None,
        timeout: float = 10.0,
    ) -> Answer:
        try:
            return await self._request(method, url, headers or {}, json, content, timeout)
        except Refused as e:
            metrics.OUTBOUND_REFUSED.labels(self.kind, e.reason).inc()
            raise

    async def _request(
        self, method: str, url: str, headers: dict[str, str], json: Any, content: bytes | None, timeout: float
    ) -> Answer:
        target = httpx.URL(url)
        for _ in range(self.max_redirects + 1):
            if target.scheme not in ("http", "https") or not target.host:
                raise Refused("scheme_not_allowed")
            port = target.port or (443 if target.scheme == "https" else 80)
            ip = await self.policy.resolve(target.host, port)
            pinned = target.copy_with(host=str(ip))
            sent_headers = {**headers, "host": target.netloc.decode("ascii"), "accept-encoding": "identity"}
            ext = {"sni_hostname": target.host} if target.scheme == "https" else {}
            req = self.http.build_request(
                method, pinned, headers=sent_headers, json=json, content=content, timeout=timeout, extensions=ext
            )
            resp = await self.http.send(req, stream=True)
            try:
                location = resp.headers.get("location")
                if resp.status_code in REDIRECTS and location:
                    target = target.join(location)
                    if resp.status_code == 303 or (resp.status_code in (301, 302) and method != "GET"):
                        method, json, content = "GET", None, None
                    continue
                body = await self._read(resp)
                return Answer(resp.status_code, resp.headers.get("content-type", ""), body, resp.headers)
            finally:
                await resp.aclose()
        raise Refused("too_many_redirects")

    async def _read(self, resp: httpx.Response) -> bytes:
        if resp.headers.get("content-encoding", "identity").lower() != "identity":
            raise Refused("content_encoding")  # a compressed answer could expand past the cap
        declared = resp.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            raise TooLarge("too_large")
        chunks, size = [], 0
        async for chunk in resp.aiter_raw():
            size += len(chunk)
            if size > self.max_bytes:
                raise TooLarge("too_large")
            chunks.append(chunk)
        return b"".join(chunks)

    async def aclose(self) -> None:
        await self.http.aclose()
