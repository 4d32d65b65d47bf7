"""metrics.observe_many must leave a histogram exactly as observing each amount would."""

from __future__ import annotations

import random

from prometheus_client import CollectorRegistry, Histogram

from nudgeflow.agents.metrics import observe_many

BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 300, 3600)


def samples(h: Histogram) -> list[tuple[str, dict[str, str], float]]:
    return [(s.name, s.labels, s.value) for m in h.collect() for s in m.samples]


def test_observe_many_equals_observe_one_by_one_on_bucket_edges_and_beyond() -> None:
    rng = random.Random(7)
    amounts = [*BUCKETS, 0.0, 7200.0, *(rng.uniform(0, 4000) for _ in range(500))]
    one, many = (Histogram("h", "h", buckets=BUCKETS, registry=CollectorRegistry()) for _ in range(2))
    for a in amounts:
        one.observe(a)
    observe_many(many, amounts)
    observe_many(many, [])
    assert samples(many) == samples(one)
    assert samples(one)[-3][2] == len(amounts)  # the +Inf bucket counts every observation
