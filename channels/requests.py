"""The send-request schema on the channel topics (nudgeflow.send.<channel>), keyed by user id.

{"key": "9f2c...",              # idempotency key: deterministic, the same on every replay
 "channel": "push", "user_id": "u42",
 "journey": "clevertap-cart-inaction", "journey_version": 1, "step": "push_offer",
 "instance": 3,                 # the user's n-th entry into this journey
 "template": "cart_inaction_offer",
 "content": {"title": "...", "body": "..."},   # rendered texts (subject/title/body/text/html/url/image)
 "data": {...},                 # extra rendered fields from the step's data:
 "created_at": 1767225600000,   # the journey time the step ran (epoch ms)
 "trigger_event_id": "e-1" | null,
 "fallback": {...same shape...} | null}        # to send instead if this channel is unreachable
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict


class SendRequestModel(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)

    key: str
    channel: str
    user_id: str
    journey: str
    journey_version: int
    step: str
    instance: int
    template: str | None = None
    content: dict[str, str] = {}
    data: dict[str, Any] = {}
    created_at: int
    trigger_event_id: str | None = None
    fallback: SendRequestModel | None = None
