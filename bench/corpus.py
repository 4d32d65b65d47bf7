"""A deterministic, varied input corpus for every seed journey: the engine's equivalence check.

    .venv/bin/python bench/corpus.py --out /tmp/corpus [--users 400] [--events 6000] [--seed 7]

Writes events.jsonl and profiles.jsonl: every event name, property and profile attribute the seed
journeys use (entries, goals, exits, wait_for, segments, attribute triggers, call-less paths),
spread over 120 days with bursts, late and out-of-order events. `nudgeflow simulate` over it
before and after an engine change must print the same bytes (see README "Benchmark").
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path

import orjson

T0 = 1_767_225_600_000  # 2026-01-01
DAY = 86_400_000
EVENTS = [
    ("add_to_cart", 14),
    ("charged", 6),
    ("page_viewed", 18),
    ("purchase", 3),
    ("screen_view", 4),
    ("add_to_favorites", 3),
    ("app_downloaded", 2),
    ("login", 4),
    ("emi_paid", 2),
    ("lesson_completed", 6),
    ("course_started", 2),
    ("course_completed", 2),
    ("trial_started", 2),
    ("subscription_paid", 2),
    ("recommendation_viewed", 1),
    ("loan_closed", 1),
    ("checkout_completed", 2),
]
CATEGORIES = ["Insurance", "CreditCard", "Loans", "Shoes", "Books"]


def props(rng: random.Random, name: str) -> dict[str, object]:
    p: dict[str, object] = {"platform": rng.choice(["web", "android", "ios"])}
    if name in ("add_to_cart", "add_to_favorites", "screen_view"):
        p |= {"product": f"sku-{rng.randrange(50)}", "price": round(rng.uniform(5, 300), 2), "category": "Shoes"}
    if name in ("charged", "purchase", "checkout_completed"):
        p |= {"amount": round(rng.uniform(5, 400), 2), "product": f"sku-{rng.randrange(50)}"}
    if name == "page_viewed":
        p |= {"page_category": rng.choice(CATEGORIES), "url": f"/p/{rng.randrange(99)}"}
    if name.startswith("course") or name == "lesson_completed":
        p |= {"course_id": f"c{rng.randrange(5)}", "course_name": f"Course {rng.randrange(5)}"}
    return p


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--users", type=int, default=400)
    ap.add_argument("--events", type=int, default=6000)
    ap.add_argument("--seed", type=int, default=7)
    a = ap.parse_args()
    rng = random.Random(a.seed)
    names, weights = zip(*EVENTS, strict=True)
    a.out.mkdir(parents=True, exist_ok=True)
    with (a.out / "events.jsonl").open("wb") as f:
        for i in range(a.events):
            user = f"u{rng.randrange(a.users):04d}"
            name = rng.choices(names, weights)[0]
            ts = T0 + int(i / a.events * 120 * DAY) + rng.randrange(-6 * 3_600_000, 3_600_000)  # some late
            doc = {"user_id": user, "event": name, "ts": ts, "props": props(rng, name), "event_id": f"e{i}"}
            f.write(orjson.dumps(doc) + b"\n")
    with (a.out / "profiles.jsonl").open("wb") as f:
        for u in range(a.users):
            attrs: dict[str, object] = {"first_name": f"N{u}", "cart_items": rng.randrange(4), "emi_amount": 120}
            if rng.random() < 0.4:
                attrs["emi_due_date"] = f"2026-0{rng.randrange(1, 5)}-{rng.randrange(10, 28)}"
            f.write(orjson.dumps({"user_id": f"u{u:04d}", "attributes": attrs}) + b"\n")
            for _k in range(rng.randrange(3)):
                later = {
                    rng.choice(
                        ["inactivity_segment", "churn_risk", "lead_score", "emi_due_date", "cart_items"]
                    ): rng.choice(["D-30", "D-60", "D-90", "high", 7, "2026-03-15", 0, None])
                }
                ts = T0 + rng.randrange(120 * DAY)
                f.write(orjson.dumps({"user_id": f"u{u:04d}", "ts": ts, "attributes": later}) + b"\n")


if __name__ == "__main__":
    main()
