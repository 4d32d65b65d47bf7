"""The journey file format, as pydantic models: validation with paths, and the JSON Schema export.

A journey file is YAML. Its shape (see README "Journey files"):

    journey: cart-abandonment          # id: lowercase, digits, '-' and '_'
    name: Cart abandonment push
    version: 1
    entry:    {event: add_to_cart, where: {...}, eligibility: multiple, lock: 1d, cap: {...}}
    goal:     {event: charged, within: 30m}
    exit_when: [{event: charged}]
    steps:                              # ordered; each step flows into the next unless it says
      wait_half_hour: {wait: 30m}       # otherwise
      push_offer: {send: push, title: ..., body: ...}

Conditions (`if`, `branch`, segments) and property filters (`where`) are free-form mappings here
and checked by `engine.compiler`, which reports errors with the same file/line/path precision.
"""

from __future__ import annotations

import datetime as dt
from typing import Annotated, Any, Literal, get_args

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, PositiveInt

from nudgeflow.engine.durations import parse_duration

Channel = Literal["email", "sms", "push", "webpush", "whatsapp", "inapp", "webhook"]
CHANNELS: tuple[str, ...] = get_args(Channel)  # the one list of channels
ID_PATTERN = r"^[a-z0-9][a-z0-9_\-]*$"


def _duration(v: str) -> str:
    parse_duration(v)
    return v


def _signed_duration(v: str) -> str:
    parse_duration(v, allow_negative=True)
    return v


Duration = Annotated[str, AfterValidator(_duration), Field(examples=["30m", "1d", "2h30m"])]
SignedDuration = Annotated[str, AfterValidator(_signed_duration), Field(examples=["-10d", "2h"])]
StepRef = Annotated[str, Field(pattern=ID_PATTERN, description="a step id, or 'end'")]
Where = Annotated[
    dict[str, Any],
    Field(
        description="property filter: {prop: value} or {prop: {eq|ne|gt|gte|lt|lte|in|contains|exists: v}}"
        ", combined with any/all/not"
    ),
]
Condition = Annotated[
    dict[str, Any],
    Field(description="attribute / in_segment / has_done / reachable / all / any / not"),
]


class Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Cap(Model):
    """At most `max` entries per user within `per` (a sliding window); without `per`, ever."""

    max: PositiveInt
    per: Duration | None = None


class Entry(Model):
    """Who enters, on what, and how often."""

    event: str | list[str] | None = Field(None, description="entry on this event, or on any of a list (action based)")
    where: Where = {}
    segment_entered: str | None = Field(None, description="entry when the user enters this segment")
    segment_left: str | None = Field(None, description="entry when the user leaves this segment")
    attribute_changed: str | None = Field(None, description="entry when this profile attribute changes")
    enrolled: bool = Field(False, description="entry by a one-off list of users (nudgeflow enroll)")
    audience: list[str] = Field([], description="segments; the user must be in at least one (all if empty)")
    eligibility: Literal["once", "multiple"] = "multiple"
    lock: Duration | None = Field(None, description="after an entry, no new entry for this long")
    cap: Cap | None = None
    while_active: Literal["ignore", "restart"] = Field(
        "ignore", description="a new trigger while the user is in the journey: ignore it, or restart"
    )
    starts_at: dt.datetime | None = None
    ends_at: dt.datetime | None = None
    instance_per: str | None = Field(
        None,
        description="a property of the triggering event (e.g. cart_id): the user runs one instance of the journey "
        "per value, each with its own steps and timers; a trigger without it is not entered",
    )
    include_current_members: bool = Field(
        False,
        description="segment_entered: when the journey (or a new version) activates, users already in the "
        "segment enter too (the worker scans its users; simulate at starts_at)",
    )


class Goal(Model):
    """Reaching the goal counts a conversion and (by default) exits the user."""

    event: str
    where: Where = {}
    within: Duration | None = Field(None, description="attribution window from entry")
    exit: bool = True


class ExitRule(Model):
    event: str
    where: Where = {}


class Content(Model):
    """Message fields; every text is a Jinja template over trigger, event, profile, vars, user."""

    template: str | None = Field(None, description="template id the sender may use")
    subject: str | None = None
    title: str | None = None
    body: str | None = None
    text: str | None = None
    html: str | None = None
    url: str | None = None
    image: str | None = None
    data: dict[str, Any] = {}
    to: str | None = Field(
        None,
        description="recipient (a template); default: the profile attribute of the channel: email (email), "
        "phone (sms, whatsapp), push_token (push), webpush_subscription (webpush)",
    )
    expires_after: Duration | None = Field(
        None,
        description="senders do not deliver the message when it is older than this (default by channel: push and "
        "webpush 12h, sms and whatsapp 1d, email 3d, inapp 7d, webhook 1d)",
    )


class Fallback(Content):
    send: Channel
    fallback: Fallback | None = None


class SendStep(Content):
    send: Channel
    fallback: Fallback | None = Field(None, description="channel to use when this one is unreachable")
    next: StepRef | None = None


class WaitStep(Model):
    wait: Duration
    next: StepRef | None = None


class UntilAttribute(Model):
    attribute: str
    offset: SignedDuration | None = None


class WaitUntilStep(Model):
    wait_until: dt.datetime | dt.date | UntilAttribute
    if_missing: Literal["continue", "end"] = "continue"
    next: StepRef | None = None


class Window(Model):
    days: list[Literal["mon", "tue", "wed", "thu", "fri", "sat", "sun"]] = [
        "mon",
        "tue",
        "wed",
        "thu",
        "fri",
        "sat",
        "sun",
    ]
    start: str = Field("00:00", pattern=r"^\d\d:\d\d$", alias="from")
    end: str = Field("24:00", pattern=r"^\d\d:\d\d$", alias="to")
    timezone: str = Field("UTC", description="IANA zone; or 'attribute:<name>' for the user's own")


class WaitWindowStep(Model):
    wait_window: Window
    next: StepRef | None = None


class WaitForStep(Model):
    wait_for: str = Field(description="event name")
    where: Where = {}
    timeout: Duration
    on_timeout: StepRef
    next: StepRef | None = Field(None, description="where to go when the event happens (default: next step)")


class IfStep(Model):
    model_config = ConfigDict(populate_by_name=True)
    if_: Condition = Field(alias="if")
    then: StepRef | None = None
    else_: StepRef | None = Field(None, alias="else")


class Case(Model):
    when: Condition
    next: StepRef


class BranchStep(Model):
    branch: list[Case] = Field(min_length=1)
    otherwise: StepRef | None = None


class Arm(Model):
    percent: Annotated[int, Field(ge=0, le=100)]
    next: StepRef | None = None
    control: bool = Field(False, description="the control group receives nothing and leaves")


class SplitStep(Model):
    split: list[Arm] = Field(min_length=2)


class Update(Model):
    set: dict[str, Any] = {}
    increment: dict[str, float] = {}
    unset: list[str] = []


class UpdateStep(Model):
    update: Update
    next: StepRef | None = None


class CallStep(Model):
    call: str = Field(description="URL (a template)")
    method: Literal["GET", "POST"] = "GET"
    headers: dict[str, str] = {}
    body: dict[str, Any] | None = None
    save_as: str = Field(pattern=r"^[a-z_][a-z0-9_]*$")
    timeout: Duration = "10s"
    on_error: StepRef | None = Field(None, description="where to go when the call fails or times out (default: end)")
    next: StepRef | None = None


class EndStep(Model):
    end: Literal[True]


StepModel = (
    SendStep
    | WaitStep
    | WaitUntilStep
    | WaitWindowStep
    | WaitForStep
    | IfStep
    | BranchStep
    | SplitStep
    | UpdateStep
    | CallStep
    | EndStep
)

STEP_KINDS: dict[str, type[StepModel]] = {
    "send": SendStep,
    "wait": WaitStep,
    "wait_until": WaitUntilStep,
    "wait_window": WaitWindowStep,
    "wait_for": WaitForStep,
    "if": IfStep,
    "branch": BranchStep,
    "split": SplitStep,
    "update": UpdateStep,
    "call": CallStep,
    "end": EndStep,
}


class JourneyFile(Model):
    journey: str = Field(pattern=ID_PATTERN, description="the journey id; stable across versions")
    name: str
    version: PositiveInt = 1
    description: str = ""
    source: str = ""
    status: Literal["active", "paused", "stopped"] = "active"
    category: Literal["marketing", "transactional"] = Field(
        "marketing",
        description="transactional journeys (receipts, OTPs, reminders owed) are exempt from frequency caps",
    )
    when_capped: Literal["skip", "delay"] = Field(
        "skip", description="a send over a frequency cap is skipped (counted), or delayed until the cap allows it"
    )
    entry: Entry
    goal: Goal | None = None
    exit_when: list[ExitRule] = []
    steps: dict[str, dict[str, Any]] = Field(min_length=1, description="ordered: id -> step")


class FrequencyCap(Model):
    """At most `max` marketing messages per `per` (on `channel`, or on all channels)."""

    max: PositiveInt
    per: Duration
    channel: Channel | None = None


class SegmentsFile(Model):
    """A file of shared definitions: segments, and the frequency caps every marketing journey obeys."""

    segments: dict[str, Condition] = {}
    frequency_caps: list[FrequencyCap] = Field(
        [],
        description="per user, across all marketing journeys: "
        "e.g. [{max: 3, per: 1d}, {max: 1, per: 1h, channel: push}]",
    )


def json_schema() -> dict[str, Any]:
    """JSON Schema (draft 2020-12) of a journey file, for editors."""
    schema = JourneyFile.model_json_schema(by_alias=True)
    defs = schema.setdefault("$defs", {})
    refs = []
    for model in STEP_KINDS.values():
        sub = model.model_json_schema(by_alias=True, ref_template="#/$defs/{model}")
        defs.update(sub.pop("$defs", {}))
        defs[model.__name__] = sub
        refs.append({"$ref": f"#/$defs/{model.__name__}"})
    schema["properties"]["steps"]["additionalProperties"] = {"oneOf": refs}
    schema["properties"]["steps"]["propertyNames"] = {"pattern": ID_PATTERN}
    schema["title"] = "nudgeflow journey"
    return schema
