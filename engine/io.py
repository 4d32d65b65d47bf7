"""What goes into the engine (inputs) and what comes out (effects). Plain data, never changed
once made.

Inputs are `msgspec.Struct`s: made in C, a quarter of a slotted dataclass's cost (the worker makes
one or two per input message), and left out of the garbage collector's tracking (`gc=False`: they
hold decoded JSON, never a cycle). Effects stay dataclasses: `streams.wire` validates send and call
requests with pydantic, which reads dataclasses (and not `frozen`: frozen dataclasses cost three
times as much to create)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import msgspec
from msgspec import Struct

from nudgeflow.engine.state import UserState


class Event(Struct, gc=False):
    """Something a user did: page_viewed, add_to_cart, charged or any custom event."""

    user_id: str
    name: str
    ts: int  # event time, epoch milliseconds
    props: Mapping[str, Any] = msgspec.field(default_factory=dict)
    event_id: str | None = None


class Tick(Struct, gc=False):
    """A timer fired: the engine runs every step of this user that is due at `now`."""

    user_id: str


class ProfileUpdate(Struct, gc=False):
    """Profile attributes changed (None removes an attribute)."""

    user_id: str
    ts: int
    attributes: Mapping[str, Any]


class Enroll(Struct, gc=False):
    """A one-off entry of a user into a journey with `entry: {enrolled: true}` (CSV upload)."""

    user_id: str
    journey: str
    ts: int
    props: Mapping[str, Any] = msgspec.field(default_factory=dict)


class CallResult(Struct, gc=False):
    """The answer to a CallRequest (a webhook / recommendation API call)."""

    user_id: str
    key: str  # the CallRequest's key
    ok: bool
    body: Any = None


class Feedback(Struct, gc=False):
    """What became of a message, from a sender or the site's tracking (FEEDBACK_STATUSES); with the
    send request's key, journey and step when it is about one message."""

    user_id: str
    channel: str
    status: str
    key: str | None = None
    journey: str | None = None
    step: str | None = None


# delivered, failed (dead-lettered), opened, clicked: counted per journey step; bounced and
# unreachable: the channel is not used again (until `reachable`); unsubscribed: an opt-out (until
# `subscribed`), fallbacks skip the channel
FEEDBACK_STATUSES = frozenset(
    {"delivered", "failed", "opened", "clicked", "bounced", "unreachable", "reachable", "unsubscribed", "subscribed"}
)


class MemberCheck(Struct, gc=False):
    """A journey with `include_current_members` activated: enter this user now if they are in its
    segment (the worker's paced scan of its users, `simulate` at the journey's starts_at)."""

    user_id: str
    journey: str


Input = Event | Tick | ProfileUpdate | Enroll | CallResult | Feedback | MemberCheck


@dataclass(slots=True)
class SendRequest:
    """A message to deliver; goes onto the channel's topic. `key` is the idempotency key."""

    key: str
    channel: str
    user_id: str
    journey: str
    journey_version: int
    step: str
    instance: int
    template: str | None
    content: Mapping[str, str]
    data: Mapping[str, Any]
    created_at: int
    trigger_event_id: str | None = None
    fallback: SendRequest | None = None
    to: str | None = None  # the recipient: address, number, device token, subscription (None: unknown)
    expires_at: int | None = None  # epoch ms after which senders do not deliver it


@dataclass(slots=True)
class CallRequest:
    """Call an HTTP API for a user; the answer comes back as CallResult with the same key."""

    key: str
    user_id: str
    journey: str
    step: str
    method: str
    url: str
    headers: Mapping[str, Any]
    body: Any
    timeout_ms: int
    created_at: int


CountKind = Literal[
    "entered",
    "skipped",
    "exited",
    "converted",
    "visit",
    "step",
    "unreachable",
    "sent",
    "template_error",
    "feedback",
    "capped",
    "experiment",
    "admitted",
]


@dataclass(slots=True)
class Count:
    """An analytics count. `detail` by kind: skipped/exited -> reason; converted -> "" or
    "after_exit"; visit/unreachable/template_error/capped -> step id; step -> "<step>:<outcome>";
    feedback -> "<step>:<status>"; experiment -> "<split step>:<arm>:entered|converted";
    sent -> channel."""

    kind: CountKind
    journey: str
    detail: str = ""


@dataclass(slots=True)
class ProfileChanged:
    """A journey's `update` step changed profile attributes (for a profile sink)."""

    user_id: str
    attributes: Mapping[str, Any]
    ts: int


@dataclass(slots=True)
class TimerSet:
    user_id: str
    due: int


@dataclass(slots=True)
class TimerCleared:
    user_id: str
    due: int


Effect = SendRequest | CallRequest | Count | ProfileChanged | TimerSet | TimerCleared
CountKey = tuple[CountKind, str, str]  # (kind, journey, detail): a Count as the engine reports it


class Sink(Protocol):
    """Where the engine reports what an input caused (`core.apply`). `core.EffectList` keeps effect
    objects; the worker's batch core tallies counts and encodes messages as they come."""

    def count(self, c: CountKey, /) -> None:
        """One analytics count (a tuple, not three arguments: the worker's sink is `list.append`,
        which costs no Python call for the several counts an event makes)."""

    def emit(self, fx: SendRequest | CallRequest | ProfileChanged) -> None: ...

    def timer(self, user: str, old: int | None, new: int | None) -> None:
        """The user's next wake-up moved from `old` to `new` (either may be None)."""


@dataclass(slots=True)
class Result:
    state: UserState
    effects: list[Effect]
    changed: bool = True
