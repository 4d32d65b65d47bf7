"""Delivery providers and their registry. A provider delivers one request, or says the user is
unreachable; `nudgeflow send --provider NAME` picks one from `PROVIDERS` by name.

Adding a provider: a class with `deliver` and `close`, registered with `@register("name")`; its
factory receives the channel it serves.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Protocol, TextIO

from nudgeflow.engine.errors import NudgeflowError
from nudgeflow.engine.io import SendRequest


class Unreachable(NudgeflowError):
    """The user cannot be reached on this channel (no address, bounced, opted out)."""


class UnknownProvider(NudgeflowError):
    def __init__(self, name: str) -> None:
        super().__init__(f"unknown provider '{name}'; available: {', '.join(sorted(PROVIDERS))}")


class Provider(Protocol):
    async def deliver(self, req: SendRequest) -> None: ...

    async def close(self) -> None: ...


ProviderFactory = Callable[[str], Provider]  # channel -> provider
PROVIDERS: dict[str, ProviderFactory] = {}


def register(name: str) -> Callable[[ProviderFactory], ProviderFactory]:
    def add(factory: ProviderFactory) -> ProviderFactory:
        PROVIDERS[name] = factory
        return factory

    return add


def make_provider(name: str, channel: str) -> Provider:
    factory = PROVIDERS.get(name)
    if factory is None:
        raise UnknownProvider(name)
    return factory(channel)


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


@register("console")
def _console(channel: str) -> Provider:
    return ConsoleProvider()
