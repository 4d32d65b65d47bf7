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

The type is the engine's own `engine.io.SendRequest`; senders validate messages against it.
"""

from __future__ import annotations

from typing import Any

from pydantic import TypeAdapter

from nudgeflow.engine.io import SendRequest

_ADAPTER = TypeAdapter(SendRequest)


def parse_send_request(doc: Any) -> SendRequest:
    """A decoded JSON message -> SendRequest; raises pydantic.ValidationError when malformed."""
    return _ADAPTER.validate_python(doc)
