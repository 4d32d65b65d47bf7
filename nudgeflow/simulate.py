"""`nudgeflow simulate`: run journey files over an events file with a virtual clock, no broker.

Events file: JSON lines in the topic schema, each with its `event` name (as on custom_events).
Profiles file (optional): JSON lines `{"user_id", "ts"?, "attributes"}`; a line without `ts` is
applied before the first event. Output: the send requests in time order, then a per-step and a
per-journey summary, as JSON lines (to --out DIR as sends.jsonl and summary.jsonl, or stdout).
"""

from __future__ import annotations

import math
import re
import sys
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

import orjson

from nudgeflow.engine.errors import NudgeflowError
from nudgeflow.engine.graph import JourneySet
from nudgeflow.engine.io import CallRequest, CallResult, Count, Input, SendRequest
from nudgeflow.engine.simulate import Simulator, input_time
from nudgeflow.streams.events import MIN_TS, Decoder, Invalid, Release
from nudgeflow.streams.wire import send_request_doc

FAR_FUTURE = 2**62
DRAIN_HORIZON_MS = 400 * 86_400_000  # without --until: run timers up to 400 days after the last input


def read_inputs(path: Path, profiles: Path | None, err: IO[str]) -> tuple[list[Input], int]:
    decoder = Decoder(max_bytes=1 << 20, max_future_ms=FAR_FUTURE)
    inputs: list[Input] = []
    bad = 0
    if profiles:
        for n, line in _lines(profiles):
            doc = _json(line)
            if not isinstance(doc, dict) or not isinstance(doc.get("attributes"), dict) or "user_id" not in doc:
                err.write(f"{profiles}:{n}: a profile line needs user_id and attributes\n")
                bad += 1
                continue
            ts = doc.get("ts")
            got = decoder.decode(
                "user_profiles", orjson.dumps({**doc, "ts": ts if ts is not None else MIN_TS}), None, 0
            )
            if isinstance(got, Invalid):
                err.write(f"{profiles}:{n}: {got.reason}: {got.detail}\n")
                bad += 1
            elif not isinstance(got, Release):
                inputs.append(got)
    for n, line in _lines(path):
        got = decoder.decode("custom_events", line, None, 0)
        if isinstance(got, Invalid):
            err.write(f"{path}:{n}: {got.reason}: {got.detail}\n")
            bad += 1
        elif not isinstance(got, Release):  # quarantine is the worker's: nothing to release here
            inputs.append(got)
    return inputs, bad


def _lines(path: Path) -> Iterator[tuple[int, bytes]]:
    with path.open("rb") as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                yield n, line.strip()


def _json(line: bytes) -> Any:
    try:
        return orjson.loads(line)
    except orjson.JSONDecodeError:
        return None


def canned_answers(path: Path) -> Callable[[CallRequest], CallResult | None]:
    """`--calls FILE`: JSON lines `{"url": "<regex>", "body": {...}}` (a success whose body is saved)
    or `{"url": "<regex>", "error": "<why>"}` (a failure: the step's on_error); the first line whose
    pattern is found in the call's URL answers it."""
    rules = []
    for n, line in _lines(path):
        doc = _json(line)
        if (
            not isinstance(doc, dict)
            or not isinstance(doc.get("url"), str)
            or ("body" not in doc) == ("error" not in doc)
        ):
            raise NudgeflowError(f"{path}:{n}: needs url (a regular expression) and body or error")
        try:
            rules.append((re.compile(doc["url"]), "body" in doc, doc.get("body", {"error": doc.get("error")})))
        except re.error as e:
            raise NudgeflowError(f"{path}:{n}: url: {e}") from None

    def answer(req: CallRequest) -> CallResult | None:
        for pattern, ok, body in rules:
            if pattern.search(req.url):
                return CallResult(req.user_id, req.key, ok, body)
        return None

    return answer


def simulate(
    js: JourneySet,
    inputs: list[Input],
    until: int | None,
    answer: Callable[[CallRequest], CallResult | None] | None = None,
) -> Simulator:
    sim = Simulator(js, answer=answer)
    sim.feed_all(inputs)  # stable: a profile line without ts (MIN_TS) comes before any event
    last = max((input_time(i) for i in inputs), default=0)
    sim.run_until(until if until is not None else last + DRAIN_HORIZON_MS)
    return sim


def summary(sim: Simulator) -> list[dict[str, Any]]:
    steps: dict[tuple[str, str], Counter[str]] = defaultdict(Counter)
    journeys: dict[str, dict[str, Any]] = defaultdict(
        lambda: {"entered": 0, "converted": 0, "exited": Counter(), "skipped": Counter(), "sent": Counter()}
    )
    for _, fx in sim.log:
        if isinstance(fx, SendRequest):
            steps[(fx.journey, fx.step)]["sent_" + fx.channel] += 1
        elif isinstance(fx, Count):
            j = journeys[fx.journey]
            if fx.kind == "visit":
                steps[(fx.journey, fx.detail)]["visits"] += 1
            elif fx.kind == "step":
                step, _, outcome = fx.detail.partition(":")
                steps[(fx.journey, step)][outcome] += 1
            elif fx.kind in ("unreachable", "template_error", "capped"):
                steps[(fx.journey, fx.detail)][fx.kind] += 1
            elif fx.kind in ("entered", "converted"):
                j[fx.kind] += 1
            elif fx.kind in ("exited", "skipped", "sent"):
                j[fx.kind][fx.detail] += 1

    def in_journey_order(item: tuple[tuple[str, str], Counter[str]]) -> tuple[str, int, str]:
        (jid, step), _ = item
        j = sim.journeys.journeys.get(jid)
        order = list(j.steps) if j else []
        return jid, order.index(step) if step in order else len(order), step

    out: list[dict[str, Any]] = [
        {"type": "step", "journey": j, "step": s, **dict(c)}
        for (j, s), c in sorted(steps.items(), key=in_journey_order)
    ]
    out += [
        {"type": "journey", "journey": j, **{k: dict(v) if isinstance(v, Counter) else v for k, v in d.items()}}
        for j, d in sorted(journeys.items())
    ]
    out += experiment_results(sim)
    return out


def experiment_results(sim: Simulator) -> list[dict[str, Any]]:
    """Per split arm: users who entered it, converted, the conversion rate, and the difference from
    the control arm in percentage points with its 95 % confidence interval (normal approximation
    of the difference of two proportions)."""
    arms: dict[tuple[str, str, str], Counter[str]] = defaultdict(Counter)
    for _, fx in sim.log:
        if isinstance(fx, Count) and fx.kind == "experiment":
            split, arm, what = fx.detail.split(":", 2)
            arms[(fx.journey, split, arm)][what] += 1
    rows = []
    for (jid, split, arm), c in sorted(arms.items()):
        n, k = c["entered"], c["converted"]
        row: dict[str, Any] = {"type": "experiment", "journey": jid, "split": split, "arm": arm, "entered": n}
        row.update(converted=k, rate=round(k / n, 4) if n else None)
        ctrl = arms.get((jid, split, "control"))
        if arm != "control" and ctrl and ctrl["entered"] and n:
            p1, p0, n0 = k / n, ctrl["converted"] / ctrl["entered"], ctrl["entered"]
            diff, se = p1 - p0, math.sqrt(p1 * (1 - p1) / n + p0 * (1 - p0) / n0)
            row.update(
                uplift_pp=round(100 * diff, 2),
                ci95_pp=[round(100 * (diff - 1.96 * se), 2), round(100 * (diff + 1.96 * se), 2)],
            )
        rows.append(row)
    return rows


def write(sim: Simulator, out_dir: Path | None, bad: int) -> None:
    sends = sorted(sim.sends, key=lambda s: (s.created_at, s.user_id, s.journey, s.step))
    rows = [*summary(sim), {"type": "input", "invalid_lines": bad, "users": len(sim.states)}]
    if sim.unanswered:
        steps = ", ".join(f"{j}/{s} ({n})" for (j, s), n in sorted(sim.unanswered.items()))
        sys.stderr.write(
            f"simulate: call steps not run (no --calls answer; they timed out as a worker's would "
            f"without an answer): {steps}\n"
        )
        rows += [
            {"type": "unanswered_calls", "journey": j, "step": s, "calls": n}
            for (j, s), n in sorted(sim.unanswered.items())
        ]
    if out_dir:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "sends.jsonl").write_bytes(b"".join(orjson.dumps(send_request_doc(s)) + b"\n" for s in sends))
        (out_dir / "summary.jsonl").write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in rows))
        return
    for s in sends:
        sys.stdout.write(orjson.dumps({"type": "send", **send_request_doc(s)}).decode() + "\n")
    for r in rows:
        sys.stdout.write(orjson.dumps(r).decode() + "\n")
