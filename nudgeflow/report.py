"""Seeing what journeys do: per-step counts (`nudgeflow stats`) and pictures (`nudgeflow graph`).

Counts come from one of two places, read into the same `JourneyCounts`: a running worker's
/metrics (what happened since that worker started: the counters are per process; with several
workers, ask each and add up, or use the Grafana dashboard), or a `simulate --out` summary file.
Steps are always listed in journey order, never alphabetically.
"""

from __future__ import annotations

import shutil
import subprocess  # nosec B404 - runs Graphviz `dot` with fixed arguments, no shell
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, assert_never

import orjson

from nudgeflow.engine import graph as g
from nudgeflow.engine.errors import ConfigError
from nudgeflow.engine.state import recent_sends


@dataclass
class JourneyCounts:
    entered: int = 0
    converted: int = 0
    admitted: int = 0
    has_now: bool = False  # the source says who is where now (waiting_now per step)
    exited: Counter[str] = field(default_factory=Counter)
    skipped: Counter[str] = field(default_factory=Counter)
    steps: dict[str, Counter[str]] = field(default_factory=lambda: defaultdict(Counter))
    arms: dict[tuple[str, str], Counter[str]] = field(default_factory=lambda: defaultdict(Counter))  # (split, arm)


def counts_from_summary(path: Path) -> dict[str, JourneyCounts]:
    """A `simulate --out DIR` summary.jsonl (or the summary lines of simulate's stdout)."""
    out: dict[str, JourneyCounts] = defaultdict(JourneyCounts)
    for line in path.read_bytes().splitlines():
        if not line.strip():
            continue
        row = orjson.loads(line)
        if row.get("type") == "step":
            out[row["journey"]].steps[row["step"]].update(
                {k: v for k, v in row.items() if k not in ("type", "journey", "step") and isinstance(v, int)}
            )
        elif row.get("type") == "journey":
            c = out[row["journey"]]
            c.entered, c.converted = row.get("entered", 0), row.get("converted", 0)
            c.admitted = row.get("admitted_members", 0)
            c.exited.update(row.get("exited", {}))
            c.skipped.update(row.get("skipped", {}))
            c.has_now = "in_journey_at_end" in row
        elif row.get("type") == "experiment":
            arm = out[row["journey"]].arms[(row["split"], row["arm"])]
            arm.update(entered=row["entered"], converted=row["converted"])
    return out


def counts_from_metrics(text: str) -> dict[str, JourneyCounts]:
    """A worker's /metrics text (Prometheus exposition format)."""
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[str, JourneyCounts] = defaultdict(JourneyCounts)
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            lab, v = s.labels, int(s.value)
            jid = lab.get("journey")
            if not jid or not (s.name.endswith("_total") or s.name == "nudgeflow_journey_users"):
                continue
            c = out[jid]
            match s.name:
                case "nudgeflow_journey_entries_total":
                    c.entered += v
                case "nudgeflow_journey_conversions_total":
                    c.converted += v
                case "nudgeflow_journey_exits_total":
                    c.exited[lab["reason"]] += v
                case "nudgeflow_journey_entries_skipped_total":
                    c.skipped[lab["reason"]] += v
                case "nudgeflow_journey_step_visits_total":
                    c.steps[lab["step"]]["visits"] += v
                case "nudgeflow_journey_step_outcomes_total":
                    c.steps[lab["step"]][lab["outcome"]] += v
                case "nudgeflow_send_requests_total":
                    c.steps[lab["step"]]["sent_" + lab["channel"]] += v
                case "nudgeflow_delivery_feedback_total":
                    c.steps[lab["step"]][lab["status"]] += v
                case "nudgeflow_sends_capped_total" | "nudgeflow_unreachable_total" | "nudgeflow_template_errors_total":
                    kind = s.name.removeprefix("nudgeflow_").removesuffix("_total")
                    c.steps[lab["step"]][kind] += v
                case "nudgeflow_journey_users":
                    c.steps[lab["step"]]["waiting_now"] += v
                    c.has_now = True
                case "nudgeflow_experiment_users_total":
                    c.arms[(lab["split"], lab["arm"])][lab["outcome"]] += v
                case "nudgeflow_member_scan_users_total" if lab.get("outcome") == "admitted":
                    c.admitted += v
                case _:
                    pass
    return out


def fetch_metrics(url: str) -> str:
    import httpx

    try:
        r = httpx.get(url, timeout=10)
        r.raise_for_status()
    except httpx.HTTPError as e:
        raise ConfigError(f"{url}: {e}") from None
    return r.text


# --- stats --------------------------------------------------------------------------------------


def stats_rows(js: g.JourneySet, counts: Mapping[str, JourneyCounts]) -> list[dict[str, Any]]:
    """Per journey, then its steps in journey order."""
    rows: list[dict[str, Any]] = []
    for jid, j in js.journeys.items():
        c = counts.get(jid, JourneyCounts())
        sent = Counter[str]()
        for sc in c.steps.values():
            sent.update({k.removeprefix("sent_"): v for k, v in sc.items() if k.startswith("sent_")})
        rows.append(
            {
                "type": "journey",
                "journey": jid,
                "entered": c.entered,
                "active": (
                    sum(sc["waiting_now"] for sc in c.steps.values())
                    if c.has_now
                    else c.entered - sum(c.exited.values())
                ),
                "converted": c.converted,
                "exited": dict(c.exited),
                "skipped": dict(c.skipped),
                "sent": dict(sent),
                **({"admitted_members": c.admitted} if c.admitted else {}),
            }
        )
        for sid, node in j.steps.items():
            sc = c.steps.get(sid, Counter())
            rows.append({"type": "step", "journey": jid, "step": sid, "kind": describe(node), **dict(sc)})
        if c.arms:
            from nudgeflow.simulate import experiment_rows

            rows += experiment_rows({(jid, split, arm): n for (split, arm), n in c.arms.items()})
    return rows


def format_stats(rows: Iterable[dict[str, Any]]) -> str:
    lines = []
    for r in rows:
        if r["type"] == "journey":
            exited = ", ".join(f"{k} {v}" for k, v in sorted(r["exited"].items())) or "-"
            sent = ", ".join(f"{k} {v}" for k, v in sorted(r["sent"].items())) or "-"
            lines.append(
                f"\n{r['journey']}: entered {r['entered']}, in it now {r['active']}, converted {r['converted']}"
                f"\n  exited: {exited}\n  sent: {sent}"
            )
            if r["skipped"]:
                lines.append("  entries refused: " + ", ".join(f"{k} {v}" for k, v in sorted(r["skipped"].items())))
        elif r["type"] == "experiment":
            rate = "-" if r["rate"] is None else f"{100 * r['rate']:.1f}%"
            line = f"  split {r['split']} arm {r['arm']}: entered {r['entered']}, converted {r['converted']} ({rate})"
            if "uplift_pp" in r:
                low, high = r["ci95_pp"]
                line += f", {r['uplift_pp']:+.1f} points vs control (95% CI {low:+.1f} to {high:+.1f})"
            lines.append(line)
        else:
            skip = ("type", "journey", "step", "kind", "visits", "waiting_now")
            detail = ", ".join(f"{k} {v}" for k, v in r.items() if k not in skip)
            now = f"  here now {r['waiting_now']:>7}" if "waiting_now" in r else ""
            lines.append(f"    {r['step']:<24} {r['kind']:<28} visits {r.get('visits', 0):>8}{now}  {detail}".rstrip())
    return "\n".join(lines).lstrip("\n") + "\n"


# --- graph --------------------------------------------------------------------------------------


def describe(n: g.Node) -> str:
    """A step's kind and its main setting, in a few words."""
    match n:
        case g.Send():
            return f"send {n.message.channel}" + (f" (else {n.message.fallback.channel})" if n.message.fallback else "")
        case g.Wait():
            return f"wait {_dur(n.ms)}"
        case g.WaitUntil():
            return f"wait until {n.attribute or 'a date'}"
        case g.WaitWindow():
            return "wait for the send window"
        case g.WaitFor():
            return f"wait for {n.event} ({_dur(n.timeout)})"
        case g.Branch() | g.Split() | g.End():
            return type(n).__name__.lower()
        case g.Update():
            return "update profile"
        case g.Call():
            return f"call {n.method}"
        case _:
            assert_never(n)


def _dur(ms: int) -> str:
    for unit, size in (("d", 86_400_000), ("h", 3_600_000), ("m", 60_000), ("s", 1000)):
        if ms >= size and ms % size == 0:
            return f"{ms // size}{unit}"
    return f"{ms}ms"


@dataclass(frozen=True)
class Edge:
    source: str
    target: str
    label: str
    count: int | None


def edges(j: g.Journey, c: JourneyCounts | None) -> list[Edge]:
    """The journey's arrows with their counts where the counters tell them: an outcome (performed,
    timed out, error, control), or the visits of a step only one arrow leads to."""
    incoming = Counter(t for n in j.steps.values() for _, t in g.successors(n))
    incoming[j.first] += 1  # the entry
    out = []
    for sid, n in j.steps.items():
        sc = c.steps.get(sid, Counter()) if c else Counter[str]()
        for i, (fld, target) in enumerate(g.successors(n)):
            label, count = _edge_label(n, fld, i, sc)
            if count is None and c is not None and target != g.END and incoming[target] == 1:
                count = c.steps.get(target, Counter())["visits"]
            out.append(Edge(sid, target, label, count))
    return out


def _edge_label(n: g.Node, fld: str, i: int, sc: Counter[str]) -> tuple[str, int | None]:
    match n, fld:
        case g.WaitFor(), "next":
            return f"did {n.event}", sc["performed"]
        case g.WaitFor(), "on_timeout":
            return "timed out", sc["timed_out"]
        case g.Call(), "next":
            return "answered", None
        case g.Call(), "on_error":
            return "error / timed out", sc["error"] + sc["timed_out"]
        case g.Branch(), "branch":
            return f"case {i + 1}", None
        case g.Branch(), "otherwise":
            return "otherwise", None
        case g.Split(), _:
            upper = n.arms[i][0]
            share = upper - (n.arms[i - 1][0] if i else 0)
            return (f"control {share}%", sc["control"]) if n.arms[i][1] == g.END else (f"{share}%", None)
        case _:
            return "", None


def _trigger(j: g.Journey) -> str:
    e = j.entry
    if e.events:
        return "on " + " | ".join(e.events)
    if e.segment_entered:
        return f"enters segment {e.segment_entered}"
    if e.segment_left:
        return f"leaves segment {e.segment_left}"
    if e.attribute_changed:
        return f"{e.attribute_changed} changes"
    return "enrolled"


def _node_text(sid: str, n: g.Node, c: JourneyCounts | None) -> list[str]:
    lines = [sid, describe(n)]
    if c is not None:
        sc = c.steps.get(sid, Counter())
        lines.append(f"visits {sc['visits']}")
        sent = ", ".join(f"{k.removeprefix('sent_')} {v}" for k, v in sorted(sc.items()) if k.startswith("sent_"))
        if sent:
            lines.append(f"sent {sent}")
    return lines


@dataclass(frozen=True)
class Picture:
    """What both drawings show: the entry, each step, where users leave, and the labelled arrows."""

    entry: list[str]
    steps: list[tuple[str, g.Node, list[str]]]
    done: list[str]
    arrows: list[tuple[str, str, str]]  # (from, to, label or "")

    @classmethod
    def of(cls, j: g.Journey, c: JourneyCounts | None) -> Picture:
        exits = ", ".join(f"{k} {v}" for k, v in sorted(c.exited.items())) if c else ""
        arrows = [
            (e.source, e.target, " ".join(x for x in (e.label, "" if e.count is None else str(e.count)) if x))
            for e in edges(j, c)
        ]
        return cls(
            entry=[j.name, _trigger(j)] + ([f"entered {c.entered}"] if c is not None else []),
            steps=[(sid, n, _node_text(sid, n, c)) for sid, n in j.steps.items()],
            done=["left the journey", *([exits] if exits else [])],
            arrows=[("entry", j.first, ""), *arrows],
        )


def mermaid(j: g.Journey, c: JourneyCounts | None) -> str:
    pic = Picture.of(j, c)
    ids = {sid: f"s{i}" for i, sid in enumerate(j.steps)} | {g.END: "done", "entry": "entry"}

    def text(lines: list[str]) -> str:
        return "<br/>".join(x.replace('"', "#quot;") for x in lines)

    out = ["flowchart TD", f'  entry(["{text(pic.entry)}"])']
    out += [f'  {ids[sid]}["{text(lines)}"]' for sid, _, lines in pic.steps]
    out.append(f'  done(["{text(pic.done)}"])')
    for source, target, label in pic.arrows:
        arrow = f' -- "{label}" -->' if label else " -->"
        out.append(f"  {ids[source]}{arrow} {ids[target]}")
    return "\n".join(out) + "\n"


def dot(j: g.Journey, c: JourneyCounts | None) -> str:
    pic = Picture.of(j, c)

    def q(lines: list[str]) -> str:
        return '"' + "\\n".join(x.replace("\\", "\\\\").replace('"', '\\"') for x in lines) + '"'

    out = [
        f"digraph {q([j.id])} {{",
        '  rankdir=TB; node [shape=box, style="rounded", fontname="Helvetica"]; edge [fontname="Helvetica"];',
        f"  entry [shape=oval, label={q(pic.entry)}];",
    ]
    for sid, n, lines in pic.steps:
        shape = "diamond" if isinstance(n, (g.Branch, g.Split)) else "box"
        out.append(f"  {q([sid])} [shape={shape}, label={q(lines)}];")
    out.append(f"  {q([g.END])} [shape=oval, label={q(pic.done)}];")
    for source, target, label in pic.arrows:
        name = "entry" if source == "entry" else q([source])
        out.append(f"  {name} -> {q([target])}" + (f" [label={q([label])}]" if label else "") + ";")
    return "\n".join(out) + "\n}\n"


def render(j: g.Journey, c: JourneyCounts | None, fmt: str) -> bytes:
    """mermaid | dot as text; svg | png through Graphviz's `dot` (Debian `graphviz`)."""
    if fmt == "mermaid":
        return mermaid(j, c).encode()
    source = dot(j, c)
    if fmt == "dot":
        return source.encode()
    exe = shutil.which("dot")
    if exe is None:
        raise ConfigError(f"--format {fmt} needs Graphviz's dot (apt install graphviz); --format mermaid needs nothing")
    done = subprocess.run([exe, f"-T{fmt}"], input=source.encode(), capture_output=True, check=False)  # nosec B603
    if done.returncode != 0:
        raise ConfigError(f"dot failed: {done.stderr.decode(errors='replace').strip()}")
    return done.stdout


# --- inspect ------------------------------------------------------------------------------------


def find_user(target: Any, changelog: str, user: str) -> tuple[dict[str, Any] | None, int, int, int]:
    """The newest stored record of `user` in the state changelog (read to its end; read-only):
    (record or None, partition, offset, records of this user seen)."""
    from nudgeflow.agents.batch import upgrade_record
    from nudgeflow.agents.keys import user_key
    from nudgeflow.broker import scan_topic

    key = user_key(user)
    found: tuple[dict[str, Any] | None, int, int] = (None, -1, -1)
    n = 0
    for m in scan_topic(target, changelog):
        if m.key() == key:
            n += 1
            value = m.value()
            found = (dict(upgrade_record(orjson.loads(value))) if value else None, m.partition(), m.offset())
    return (*found, n)


def inspect_lines(js: g.JourneySet, user: str, rec: Mapping[str, Any], now_ms: int, values: bool = False) -> list[str]:
    """A support engineer's view of one user's stored record: where they are in which journey and
    until when, what they entered and sent, and why (trigger events). Profile and trigger values
    only with `values` (they may be personal data)."""
    from nudgeflow.engine.state import next_wake
    from nudgeflow.engine.timeparse import ms_to_iso

    st = rec["state"]

    def when(ms: int | None) -> str:
        if ms is None:
            return "-"
        delta = (ms - now_ms) // 1000
        rel = f"in {_ago(delta)}" if delta >= 0 else f"{_ago(-delta)} ago"
        return f"{ms_to_iso(ms)} ({rel})"

    def show(d: Mapping[str, Any]) -> str:
        if not d:
            return "{}"
        return orjson.dumps(d).decode() if values else "{" + ", ".join(sorted(d)) + "}"

    out = [f"user {user}", f"  state time: {when(st['clock'])}", f"  next wake-up: {when(next_wake(st))}"]
    if "quarantine" in rec:
        q = rec["quarantine"]
        out.append(f"  QUARANTINED since {when(q.get('since'))}: {q.get('error')} ({len(q.get('parked', []))} parked)")
    out.append("  in journeys now:" if st["instances"] else "  in no journey now")
    from nudgeflow.engine.core import journey_id

    for jid, inst in sorted(st["instances"].items()):  # jid: the journey, or journey#value (instance_per)
        j = js.journeys.get(journey_id(jid))
        node = j.steps.get(inst["step"]) if j else None
        kind = describe(node) if node is not None else "step not in the loaded journey"
        out.append(
            f"    {jid} v{inst['version']} entry #{inst['entry_no']} at {when(inst['entered'])}"
            f" (trigger event {inst['trigger_event_id'] or '-'}, trigger {show(inst['trigger'])})"
        )
        out.append(f"      at step {inst['step']} ({kind}) since {when(inst['since'])}; wakes {when(inst['wake'])}")
        extra = [f"arm {inst['arm']}"] if "arm" in inst else []
        extra += ["converted"] if inst["converted"] else []
        extra += [f"waiting for call {inst['call']}"] if "call" in inst else []
        extra += [f"saved {show(inst['vars'])}"] if inst["vars"] else []
        if extra:
            out.append("      " + "; ".join(extra))
    for jid, a in sorted(st["attribution"].items()):
        out.append(f"  left {jid} unconverted: its goal still counts until {when(a['until'])}")
    if st["entries"]:
        out.append("  entries:")
        for jid, e in sorted(st["entries"].items()):
            member = " (admitted as a current member)" if "members" in e else ""
            last = e["times"][-1] if e["times"] else None
            out.append(f"    {jid}: {e['count']} time(s), last {when(last)}{member}")
    if st.get("recent"):
        out.append("  recent sends (newest last):")
        for t, jid, step, channel, key, trigger in recent_sends(st, user):
            out.append(f"    {when(t)}  {jid}/{step} {channel} key {key} (trigger event {trigger or '-'})")
    if st.get("sent"):
        out.append(f"  marketing sends the frequency caps count: {len(st['sent'])}, last {when(st['sent'][-1][0])}")
    if st["history"] or st.get("seen"):
        out.append("  event history kept for conditions:")
        for cid, times in sorted(st["history"].items()):
            out.append(f"    {cid}: {len(times)} event(s), last {when(times[-1] if times else None)}")
        for cid, seen in sorted(st.get("seen", {}).items()):
            out.append(f"    {cid} (keyed): {len(seen)} event(s), last {when(seen[-1][0] if seen else None)}")
    out.append(f"  profile: {show(st['profile'])}")
    segs = sorted(js.segments)
    if segs:
        from nudgeflow.engine.core import segments_of

        in_now = [s for s, inside in segments_of(st, user, js, max(now_ms, st["clock"])).items() if inside]
        out.append(f"  segments now: {', '.join(in_now) or '-'}")
    return out


def _ago(seconds: int) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"
