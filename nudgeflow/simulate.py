"""`nudgeflow simulate`: run journey files over an events file with a virtual clock, no broker.

Events file: JSON lines in the topic schema, each with its `event` name (as on custom_events).
Profiles file (optional): JSON lines `{"user_id", "ts"?, "attributes"}`; a line without `ts` is
applied before the first event. Output: the send requests in time order, then a per-step and a
per-journey summary, as JSON lines (to --out DIR as sends.jsonl and summary.jsonl, or stdout).

Streaming: the files are read twice, never held. A first pass notes each line's time and place
(16 bytes a line); the second reads the lines in time order (sequentially when the file already
is, by seeking otherwise) and feeds them one by one; sends are written as they are made and the
summary is tallied as effects happen. Memory grows with the number of users (their states), not
with the input. `--trace-user ID` prints one user's path as it happens.
"""

from __future__ import annotations

import math
import re
import sys
from array import array
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import orjson

from nudgeflow.engine.errors import NudgeflowError
from nudgeflow.engine.graph import JourneySet
from nudgeflow.engine.io import (
    CallRequest,
    CallResult,
    Count,
    Effect,
    Input,
    ProfileChanged,
    SendRequest,
    TimerCleared,
    TimerSet,
)
from nudgeflow.engine.simulate import Simulator, input_time
from nudgeflow.engine.timeparse import ms_to_iso
from nudgeflow.streams.events import MIN_TS, Decoder, Invalid, Release
from nudgeflow.streams.wire import send_request_doc

FAR_FUTURE = 2**62
DRAIN_HORIZON_MS = 400 * 86_400_000  # without --until: run timers up to 400 days after the last input


class InputFiles:
    """The events file (and a profiles file) as inputs in time order, without holding them."""

    def __init__(self, events: Path, profiles: Path | None, err: IO[str]) -> None:
        self.events, self.profiles, self.err = events, profiles, err
        self.decoder = Decoder(max_bytes=1 << 20, max_future_ms=FAR_FUTURE)
        self.bad = 0
        self.size = events.stat().st_size + (profiles.stat().st_size if profiles else 0)
        self.read_bytes = 0  # progress of the second pass

    def __iter__(self) -> Iterator[Input]:
        sources = [(self.profiles, True)] if self.profiles else []
        sources.append((self.events, False))
        index: list[tuple[Path, bool, array[int], array[int]]] = []
        for path, is_profile in sources:  # first pass: (time, offset) of every line
            times, offsets = array("q"), array("q")
            for n, offset, line in _lines(path):
                got = self._decode(path, n, line, is_profile)
                if got is not None:
                    times.append(input_time(got))
                    offsets.append(offset)
            index.append((path, is_profile, times, offsets))
        yield from self._merge(index)

    def _merge(self, index: list[tuple[Path, bool, array[int], array[int]]]) -> Iterator[Input]:
        """Second pass: every file's lines in time order (stable), the files merged by time."""
        import heapq

        streams = []
        for rank, (path, is_profile, times, offsets) in enumerate(index):
            order = sorted(range(len(times)), key=times.__getitem__) if not _ascending(times) else None
            streams.append(self._ordered(path, is_profile, times, offsets, order, rank))
        yield from (inp for _, _, _, inp in heapq.merge(*streams, key=lambda x: (x[0], x[1], x[2])))

    def _ordered(
        self, path: Path, is_profile: bool, times: array[int], offsets: array[int], order: list[int] | None, rank: int
    ) -> Iterator[tuple[int, int, int, Input]]:
        with path.open("rb") as f:
            for i in order if order is not None else range(len(times)):
                if order is not None:
                    f.seek(offsets[i])
                line = f.readline()
                if order is None:  # sequential: skip the lines that did not decode
                    while f.tell() - len(line) != offsets[i]:
                        line = f.readline()
                self.read_bytes += len(line)
                got = self._decode(path, 0, line.strip(), is_profile)
                if got is not None:
                    yield times[i], rank, i, got

    def _decode(self, path: Path, n: int, line: bytes, is_profile: bool) -> Input | None:
        """One line as an input; a bad line is reported on the first pass (n: its line number)."""

        def bad(why: str) -> None:
            if n:
                self.err.write(f"{path}:{n}: {why}\n")
                self.bad += 1

        if is_profile:
            doc = _json(line)
            if not isinstance(doc, dict) or not isinstance(doc.get("attributes"), dict) or "user_id" not in doc:
                bad("a profile line needs user_id and attributes")
                return None
            ts = doc.get("ts")
            raw = orjson.dumps({**doc, "ts": ts if ts is not None else MIN_TS})
            got = self.decoder.decode("user_profiles", raw, None, 0)
        else:
            got = self.decoder.decode("custom_events", line, None, 0)
        if isinstance(got, Invalid):
            bad(f"{got.reason}: {got.detail}")
            return None
        if isinstance(got, Release):  # quarantine is the worker's: nothing to release here
            return None
        return got


def read_inputs(path: Path, profiles: Path | None, err: IO[str]) -> tuple[list[Input], int]:
    """Every input of the files in time order, as a list (tests, small files)."""
    files = InputFiles(path, profiles, err)
    inputs = list(files)
    return inputs, files.bad


def _ascending(times: array[int]) -> bool:
    return all(times[i] <= times[i + 1] for i in range(len(times) - 1))


def _lines(path: Path) -> Iterator[tuple[int, int, bytes]]:
    with path.open("rb") as f:
        offset = 0
        for n, line in enumerate(f, 1):
            if line.strip():
                yield n, offset, line.strip()
            offset += len(line)


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
    for n, _, line in _lines(path):
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


def live_answers(policy: Any, max_bytes: int) -> tuple[Callable[[CallRequest], CallResult | None], Callable[[], None]]:
    """`--calls live`: perform each call for real, as the call runner would (same outbound policy,
    size cap, retries and timeout), one at a time; returns (answer, close). Opt-in: your API sees
    the requests of every simulated user."""
    import asyncio

    from nudgeflow.channels.calls import perform_call
    from nudgeflow.channels.outbound import Outbound

    loop = asyncio.new_event_loop()
    http = Outbound(policy, max_bytes)

    def answer(req: CallRequest) -> CallResult | None:
        ok, body = loop.run_until_complete(perform_call(http, req))
        return CallResult(req.user_id, req.key, ok, body)

    def close() -> None:
        loop.run_until_complete(http.aclose())
        loop.close()

    return answer, close


@dataclass
class Summary:
    """The report's tallies, kept as effects happen (nothing per effect is held)."""

    steps: dict[tuple[str, str], Counter[str]] = field(default_factory=lambda: defaultdict(Counter))
    journeys: dict[str, dict[str, Any]] = field(
        default_factory=lambda: defaultdict(
            lambda: {"entered": 0, "converted": 0, "exited": Counter(), "skipped": Counter(), "sent": Counter()}
        )
    )
    arms: dict[tuple[str, str, str], Counter[str]] = field(default_factory=lambda: defaultdict(Counter))

    def add(self, fx: Effect) -> None:
        if isinstance(fx, SendRequest):
            self.steps[(fx.journey, fx.step)]["sent_" + fx.channel] += 1
        elif isinstance(fx, Count):
            if fx.kind == "visit":
                self.steps[(fx.journey, fx.detail)]["visits"] += 1
            elif fx.kind == "step":
                step, _, outcome = fx.detail.partition(":")
                self.steps[(fx.journey, step)][outcome] += 1
            elif fx.kind in ("unreachable", "template_error", "capped"):
                self.steps[(fx.journey, fx.detail)][fx.kind] += 1
            elif fx.kind in ("entered", "converted"):
                self.journeys[fx.journey][fx.kind] += 1
            elif fx.kind in ("exited", "skipped", "sent"):
                self.journeys[fx.journey][fx.kind][fx.detail] += 1
            elif fx.kind == "admitted":
                self.journeys[fx.journey].setdefault("admitted_members", 0)
                self.journeys[fx.journey]["admitted_members"] += 1
            elif fx.kind == "experiment":
                split, arm, what = fx.detail.split(":", 2)
                self.arms[(fx.journey, split, arm)][what] += 1

    def at_end(self, sim: Simulator) -> None:
        """Who is still in a journey when the run ends (at which step): `waiting_now` per step."""
        from nudgeflow.engine.core import journey_id

        for jid in sim.journeys.journeys:
            self.journeys[jid]["in_journey_at_end"] = 0
        for st in sim.states.values():
            for ik, inst in st["instances"].items():
                jid = journey_id(ik)
                self.steps[(jid, inst["step"])]["waiting_now"] += 1
                self.journeys[jid]["in_journey_at_end"] = self.journeys[jid].get("in_journey_at_end", 0) + 1

    def rows(self, js: JourneySet) -> list[dict[str, Any]]:
        def in_journey_order(item: tuple[tuple[str, str], Counter[str]]) -> tuple[str, int, str]:
            (jid, step), _ = item
            j = js.journeys.get(jid)
            order = list(j.steps) if j else []
            return jid, order.index(step) if step in order else len(order), step

        out: list[dict[str, Any]] = [
            {"type": "step", "journey": j, "step": s, **dict(c)}
            for (j, s), c in sorted(self.steps.items(), key=in_journey_order)
        ]
        out += [
            {"type": "journey", "journey": j, **{k: dict(v) if isinstance(v, Counter) else v for k, v in d.items()}}
            for j, d in sorted(self.journeys.items())
        ]
        return out + experiment_rows(self.arms)


def summary(sim: Simulator) -> list[dict[str, Any]]:
    """The summary rows of a simulator that kept its log (tests)."""
    s = Summary()
    for _, fx in sim.log:
        s.add(fx)
    return s.rows(sim.journeys)


def experiment_results(sim: Simulator) -> list[dict[str, Any]]:
    s = Summary()
    for _, fx in sim.log:
        s.add(fx)
    return experiment_rows(s.arms)


def experiment_rows(arms: dict[tuple[str, str, str], Counter[str]]) -> list[dict[str, Any]]:
    """Per split arm: users who entered it, converted, the conversion rate, and the difference from
    the control arm in percentage points with its 95 % confidence interval (normal approximation
    of the difference of two proportions)."""
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


def simulate(
    js: JourneySet,
    inputs: list[Input],
    until: int | None,
    answer: Callable[[CallRequest], CallResult | None] | None = None,
) -> Simulator:
    """A simulator over a list of inputs that keeps every effect (tests, small runs)."""
    sim = Simulator(js, answer=answer)
    sim.feed_all(inputs)  # stable: a profile line without ts (MIN_TS) comes before any event
    last = max((input_time(i) for i in inputs), default=0)
    sim.run_until(until if until is not None else last + DRAIN_HORIZON_MS)
    return sim


class SendWriter:
    """Send requests as JSON lines in time order, written as they are made: the sends of one moment
    are held until time moves on, then written sorted by user, journey and step."""

    def __init__(self, out: IO[bytes], tagged: bool) -> None:
        self.out, self.tagged = out, tagged
        self.at: int | None = None
        self.held: list[SendRequest] = []

    def add(self, t: int, s: SendRequest) -> None:
        if self.at is not None and s.created_at != self.at:
            self.flush()
        self.at = s.created_at
        self.held.append(s)

    def flush(self) -> None:
        for s in sorted(self.held, key=lambda s: (s.user_id, s.journey, s.step)):
            doc = send_request_doc(s)
            self.out.write(orjson.dumps({"type": "send", **doc} if self.tagged else doc) + b"\n")
        self.held.clear()


def trace_line(t: int, fx: Effect) -> str | None:
    """One line of a user's path (--trace-user), or None for effects that say nothing new."""
    when = ms_to_iso(t)
    match fx:
        case Count(kind="visit"):
            return f"{when}  {fx.journey}: step {fx.detail}"
        case Count(kind="step"):
            step, _, outcome = fx.detail.partition(":")
            return f"{when}  {fx.journey}: step {step} {outcome}"
        case Count(kind="entered"):
            return f"{when}  {fx.journey}: entered"
        case Count():
            return f"{when}  {fx.journey or '-'}: {fx.kind} {fx.detail}".rstrip()
        case SendRequest():
            return f"{when}  {fx.journey}: SEND {fx.channel} at step {fx.step} (key {fx.key})"
        case CallRequest():
            return f"{when}  {fx.journey}: CALL {fx.method} step {fx.step}"
        case TimerSet():
            return f"{when}  next wake-up {ms_to_iso(fx.due)}"
        case ProfileChanged():
            return f"{when}  profile set: {', '.join(sorted(fx.attributes))}"
        case TimerCleared():
            return None
        case _:
            return None


def run(
    js: JourneySet,
    files: InputFiles,
    until: int | None,
    out_dir: Path | None,
    answer: Callable[[CallRequest], CallResult | None] | None = None,
    trace_user: str | None = None,
    progress: Callable[[int], None] | None = None,
) -> Simulator:
    """`nudgeflow simulate`: stream the files through a simulator, write sends and the summary."""
    tally = Summary()
    if out_dir:
        out_dir.mkdir(parents=True, exist_ok=True)
    sends_out = (out_dir / "sends.jsonl").open("wb") if out_dir else sys.stdout.buffer
    writer = SendWriter(sends_out, tagged=out_dir is None)

    def listen(t: int, user: str, fx: Effect) -> None:
        tally.add(fx)
        if isinstance(fx, SendRequest):
            writer.add(t, fx)
        if trace_user is not None and user == trace_user and (line := trace_line(t, fx)) is not None:
            sys.stderr.write(f"trace {user}  {line}\n")

    sim = Simulator(js, answer=answer, listener=listen, keep_log=False)
    last, seen = 0, 0
    for inp in files:
        sim.feed(inp)
        last = max(last, input_time(inp))
        if progress is not None and files.read_bytes - seen > 1 << 20:
            progress(files.read_bytes - seen)
            seen = files.read_bytes
    if progress is not None:
        progress(files.size - seen)
    sim.run_until(until if until is not None else last + DRAIN_HORIZON_MS)
    writer.flush()
    tally.at_end(sim)
    rows = [*tally.rows(js), {"type": "input", "invalid_lines": files.bad, "users": len(sim.states)}]
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
    summary_out = (out_dir / "summary.jsonl").open("wb") if out_dir else sys.stdout.buffer
    summary_out.write(b"".join(orjson.dumps(r) + b"\n" for r in rows))
    summary_out.flush()
    if out_dir:
        sends_out.close()
        summary_out.close()
    return sim
