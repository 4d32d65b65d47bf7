"""Prometheus metrics of the worker. Names are the contract with dashboards: see README."""

from __future__ import annotations

import platform
from bisect import bisect_left
from collections.abc import Iterable, Mapping
from typing import assert_never

from prometheus_client import Counter, Gauge, Histogram, disable_created_metrics

from nudgeflow import __version__, compiled
from nudgeflow.engine.io import Count, CountKind

disable_created_metrics()  # type: ignore[no-untyped-call]  # no `_created` series beside every counter: half the series, no use

BUILD_INFO = Gauge(
    "nudgeflow_build_info",
    "The running nudgeflow (value 1); compiled: hot modules compiled / all",
    ["version", "python", "compiled"],
)
BUILD_INFO.labels(__version__, platform.python_version(), compiled.summary()).set(1)

EVENTS = Counter("nudgeflow_events_consumed_total", "Input messages consumed", ["topic"])
INVALID = Counter("nudgeflow_invalid_events_total", "Messages sent to the dead-letter topic", ["topic", "reason"])
DUPLICATES = Counter("nudgeflow_duplicate_inputs_total", "Inputs skipped as already applied (replay after crash)")
ENTRIES = Counter("nudgeflow_journey_entries_total", "Users entering a journey", ["journey"])
SKIPPED = Counter("nudgeflow_journey_entries_skipped_total", "Entries refused", ["journey", "reason"])
EXITS = Counter("nudgeflow_journey_exits_total", "Users leaving a journey", ["journey", "reason"])
CONVERSIONS = Counter("nudgeflow_journey_conversions_total", "Goals reached", ["journey"])
STEPS = Counter(
    "nudgeflow_journey_step_outcomes_total",
    "Step outcomes other than going on: timed_out, control, error",
    ["journey", "step", "outcome"],
)
VISITS = Counter("nudgeflow_journey_step_visits_total", "Steps executed (the per-step funnel)", ["journey", "step"])
UNREACHABLE = Counter("nudgeflow_unreachable_total", "Sends skipped: no reachable channel", ["journey", "step"])
TEMPLATE_ERRORS = Counter(
    "nudgeflow_template_errors_total",
    "Sends, calls or updates not made: a template failed or rendered too much for this user's data",
    ["journey", "step"],
)
SENDS = Counter("nudgeflow_send_requests_total", "Send requests produced", ["channel", "journey", "step"])
SEND_LATENCY = Histogram(
    "nudgeflow_send_latency_seconds",
    "Send request durable on its topic minus its journey time (the event's time, or the timer's due time)",
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 300, 3600),
)
FEEDBACK = Counter(
    "nudgeflow_delivery_feedback_total",
    "What became of sent messages (delivered, failed, opened, clicked, bounced, unsubscribed, ...), per journey step",
    ["journey", "step", "status"],
)
EXPERIMENT = Counter(
    "nudgeflow_experiment_users_total",
    "Users per split arm (control included): entered the arm, and converted after it",
    ["journey", "split", "arm", "outcome"],
)
JOURNEY_USERS = Gauge(
    "nudgeflow_journey_users",
    "Users at each journey step now, in this worker's partitions (stored with the state: exact across restarts)",
    ["journey", "step"],
)
MEMBER_SCAN = Counter(
    "nudgeflow_member_scan_users_total",
    "Current-members scans (entry: include_current_members): users checked, and admitted into the journey",
    ["journey", "outcome"],
)
MEMBER_SCANS_RUNNING = Gauge(
    "nudgeflow_member_scans_running", "Current-members scans not finished, per journey (partitions left)", ["journey"]
)
CAPPED = Counter("nudgeflow_sends_capped_total", "Marketing sends skipped by a frequency cap", ["journey", "step"])
REBALANCES = Counter("nudgeflow_rebalances_total", "Partition assignments this worker went through")
ASSIGNED = Gauge("nudgeflow_assigned_partitions", "State partitions this worker owns now")
PENDING_TIMERS = Gauge("nudgeflow_pending_timers", "Timers waiting in the index", ["partition"])
TICKS_EMITTED = Counter("nudgeflow_timer_ticks_emitted_total", "Due timers taken from the index by the scanner")
TIMERS_FIRED = Counter("nudgeflow_timers_fired_total", "Ticks that ran a user's due steps")
TIMERS_STALE = Counter("nudgeflow_timers_stale_total", "Ticks skipped: nothing due any more (moved or duplicate)")
TIMERS_CANCELLED = Counter("nudgeflow_timers_cancelled_total", "Timers removed by an event before they were due")
TIMER_LATENESS = Histogram(
    "nudgeflow_timer_lateness_seconds",
    "Processing time minus due time of fired timers",
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 300, 3600),
)
BATCH_SIZE = Histogram(
    "nudgeflow_batch_size", "Messages per processed batch", buckets=(1, 10, 50, 100, 250, 500, 1000, 2000, 5000)
)
BATCH_SECONDS = Histogram(
    "nudgeflow_batch_seconds",
    "Time to process and durably write one batch",
    buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
)
EVENT_TIME_LAG = Gauge(
    "nudgeflow_event_time_lag_seconds",
    "How far behind the wall clock timers are held by the inputs' event time (0: every input quiet; "
    "since the assignment while an input has not been read yet)",
    ["partition"],
)
CONSUMER_LAG = Gauge(
    "nudgeflow_consumer_lag_messages",
    "Input messages not yet applied durably: the latest fetch's high watermark minus the resume position",
    ["topic", "partition"],
)
HELD_INPUTS = Gauge("nudgeflow_held_inputs", "Inputs held back to apply topics in event-time order")
JOURNEY_INFO = Gauge(
    "nudgeflow_journey_info",
    "Loaded journeys (value 1): id, version and content digest",
    ["journey", "version", "digest"],
)
QUARANTINED = Counter(
    "nudgeflow_users_quarantined_total", "Users set aside after an error applying their input (state kept)"
)
RELEASED = Counter("nudgeflow_users_released_total", "Quarantined users released")
PARKED = Counter(
    "nudgeflow_quarantine_parked_inputs_total", "Inputs of quarantined users kept to apply on release", ["outcome"]
)
DELIVERY_FAILURES = Counter(
    "nudgeflow_delivery_failures_total",
    "Batches whose records (changelog, sends, dead letters) could not be written: held and retried",
)
RESTORE_SECONDS = Gauge("nudgeflow_restore_seconds", "Duration of the last state restore after a rebalance")
RESTORE_REMAINING = Gauge(
    "nudgeflow_restore_remaining_records",
    "Changelog records still to read by the restore in progress (0: restored)",
    ["partition"],
)
RESTORED_RECORDS = Gauge(
    "nudgeflow_restored_records", "Changelog records applied by the last restore of a partition", ["partition"]
)


def count(c: Count) -> None:
    """Apply one engine Count effect to the metrics."""
    count_many({(c.kind, c.journey, c.detail): 1})


def count_many(counts: Mapping[tuple[CountKind, str, str], int]) -> None:
    """Apply a batch's tallied engine counts (kind, journey, detail) -> n to the metrics."""
    for (kind, journey, detail), n in counts.items():
        match kind:
            case "entered":
                ENTRIES.labels(journey).inc(n)
            case "exited":
                EXITS.labels(journey, detail).inc(n)
            case "converted":
                CONVERSIONS.labels(journey).inc(n)
            case "skipped":
                SKIPPED.labels(journey, detail).inc(n)
            case "visit":
                VISITS.labels(journey, detail).inc(n)
            case "step":
                step, _, outcome = detail.partition(":")
                STEPS.labels(journey, step, outcome).inc(n)
            case "unreachable":
                UNREACHABLE.labels(journey, detail).inc(n)
            case "sent":
                pass  # by channel, journey and step: the pipeline counts them from the send requests
            case "feedback":
                step, _, status = detail.partition(":")
                FEEDBACK.labels(journey, step, status).inc(n)
            case "experiment":
                split, arm, what = detail.split(":", 2)
                EXPERIMENT.labels(journey, split, arm, what).inc(n)
            case "capped":
                CAPPED.labels(journey, detail).inc(n)
            case "template_error":
                TEMPLATE_ERRORS.labels(journey, detail).inc(n)
            case "admitted":
                MEMBER_SCAN.labels(journey, "admitted").inc(n)
            case _:
                assert_never(kind)


def observe_many(hist: Histogram, amounts: Iterable[float]) -> None:
    """`hist.observe(a)` for each amount, tallied first: one increment per bucket touched and one
    of the sum (a batch's send latencies and timer lateness: ~1 µs saved per observation).
    Reads the histogram's bucket bounds and values as prometheus-client (pinned) keeps them;
    tests/unit/test_metrics_bulk.py checks it against `observe`."""
    bounds = hist._upper_bounds  # ascending, the last is +Inf
    tally = [0] * len(bounds)
    total = 0.0
    for a in amounts:
        total += a
        tally[bisect_left(bounds, a)] += 1  # the first bucket with a <= bound, as observe picks
    if not any(tally):
        return
    hist._sum.inc(total)  # (a histogram with labels has no values of its own: observe a child)
    for i, k in enumerate(tally):
        if k:
            hist._buckets[i].inc(k)
