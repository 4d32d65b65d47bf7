"""Delivery providers. A provider delivers one request, or says the user is unreachable."""

from __future__ import annotations

import sys
from typing import Protocol, TextIO

from nudgeflow.engine.io import SendRequest


class Unreachable(Exception):
    """The user cannot be reached on this channel (no address, bounced, opted out)."""


class Provider(Protocol):
    async def deliver(self, req: SendRequest) -> None: ...

    async def close(self) -> None: ...


class ConsoleProvider:
    """Prints each request on one line: the demo's stand-in for a real push/SMS/email gateway."""

    def __init__(self, out: TextIO = sys.stdout) -> None:
        self.out = out

    async def deliver(self, req: SendRequest) -> None:
        text = req.content.get("title") or req.content.get("subject") or req.content.get("text") or req.template
        self.out.write(
            f"[{req.channel}] user={req.user_id} journey={req.journey}/{req.step} key={req.key[:12]} :: {text}\n"
        )
        self.out.flush()

    async def close(self) -> None:
        return None
