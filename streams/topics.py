"""Topic names. One optional prefix (NUDGEFLOW_TOPIC_PREFIX) isolates installations or tests; a
site's own input topics can stand in for nudgeflow's (NUDGEFLOW_INPUT_TOPICS: role -> topic)."""

from __future__ import annotations

from dataclasses import dataclass

from nudgeflow.engine.schema import CHANNELS

# Input topics and the event name each one carries when a message does not say otherwise.
EVENT_TOPICS = {"page_viewed": "page_viewed", "add_to_cart": "add_to_cart", "charged": "charged"}
CUSTOM_TOPIC = "custom_events"  # any event name; the message must carry "event"
PROFILE_TOPIC = "user_profiles"  # {"user_id", "ts", "attributes": {...}}
INPUT_ROLES = (*EVENT_TOPICS, CUSTOM_TOPIC, PROFILE_TOPIC)


@dataclass(frozen=True)
class Topics:
    prefix: str = ""
    # input roles read from a site's own topics, e.g. (("charged", "shop.orders"),): names used as
    # they are (no prefix); the role still decides the event name (charged) or how it is read
    renamed: tuple[tuple[str, str], ...] = ()

    def name(self, base: str) -> str:
        for role, topic in self.renamed:
            if role == base:
                return topic
        return f"{self.prefix}{base}"

    @property
    def inputs(self) -> list[str]:
        """Topics the journey agent consumes, all co-partitioned by user id."""
        return [self.name(t) for t in INPUT_ROLES] + [self.ticks, self.feedback]

    @property
    def user_inputs(self) -> list[str]:
        return [self.name(t) for t in INPUT_ROLES]

    @property
    def dead_letter(self) -> str:
        return self.name("nudgeflow.dead_letter")

    @property
    def ticks(self) -> str:
        """Internal: the topic whose partitions name the worker's state partitions (the timer
        scanner fires due timers in-process; tick messages found here are still applied)."""
        return self.name("nudgeflow.ticks")

    @property
    def feedback(self) -> str:
        """Delivery feedback and API call results from senders, keyed by user id."""
        return self.name("nudgeflow.feedback")

    @property
    def calls(self) -> str:
        """Call requests (webhook / recommendation API steps) for the call sender."""
        return self.name("nudgeflow.calls")

    @property
    def profile_changes(self) -> str:
        """Profile attributes changed by journeys' update steps, for a profile sink."""
        return self.name("nudgeflow.profile_changes")

    @property
    def journey_registry(self) -> str:
        """Internal, one partition, compacted: the content digest of every journey version run."""
        return self.name("nudgeflow.journeys")

    def channel(self, channel: str) -> str:
        return self.name(f"nudgeflow.send.{channel}")

    @property
    def send_dead_letter(self) -> str:
        """Send requests a sender could not deliver (after its retries, or refused for good)."""
        return self.name("nudgeflow.send.dead_letter")

    def keys(self, of: str) -> str:
        """Started and finished idempotency keys of a sender (`send.<channel>`) or of the call
        runner (`calls`), partitioned like the topic it consumes, compacted: a replica that takes
        a partition over knows what was delivered or answered (channels/consumer.py)."""
        return self.name(f"nudgeflow.keys.{of}")

    @property
    def key_topics(self) -> list[str]:
        return [*(self.keys(f"send.{c}") for c in CHANNELS), self.keys("calls")]

    @property
    def channels(self) -> list[str]:
        return [self.channel(c) for c in CHANNELS]

    def base(self, topic: str) -> str:
        """The topic's role: its name without the prefix, or the input role it was renamed for."""
        for role, name in self.renamed:
            if name == topic:
                return role
        return topic[len(self.prefix) :] if self.prefix and topic.startswith(self.prefix) else topic
