"""Prometheus metrics of the channel-side processes (senders, call runner): served on
`NUDGEFLOW_CHANNEL_METRICS_PORT` when it is set. Names are the contract with dashboards: see README."""

from __future__ import annotations

from prometheus_client import Counter, Histogram

OUTBOUND_REFUSED = Counter(
    "nudgeflow_outbound_refused_total",
    "Outbound HTTP requests refused by the policy or cut off (host, address, redirects, answer size)",
    ["kind", "reason"],
)
CALLS = Counter("nudgeflow_calls_total", "Calls answered by the call runner", ["outcome"])
FORGED = Counter(
    "nudgeflow_forged_messages_total",
    "Internal messages dropped: no valid signature (NUDGEFLOW_TOPIC_SECRET)",
    ["topic"],
)
DELIVERIES = Counter(
    "nudgeflow_sender_deliveries_total",
    "Send requests handled by a sender: delivered, unreachable, dead_lettered, duplicate",
    ["channel", "provider", "result"],
)
DEAD_LETTERS = Counter(
    "nudgeflow_sender_dead_letters_total", "Send requests a sender dead-lettered", ["channel", "reason"]
)
RETRIES = Counter("nudgeflow_sender_retries_total", "Provider calls tried again after a transient failure", ["channel"])
PROVIDER_SECONDS = Histogram(
    "nudgeflow_provider_seconds",
    "Time a provider took to accept a request (one attempt)",
    ["channel", "provider"],
    buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
REQUEST_AGE = Histogram(
    "nudgeflow_send_age_at_delivery_seconds",
    "Delivery time minus the send request's creation (event) time",
    ["channel"],
    buckets=(0.1, 0.5, 1, 5, 30, 60, 300, 3600, 86400),
)
