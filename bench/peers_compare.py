"""nudgeflow as one more job of the peer benchmark (../shared/peers): same input, same expectation.

    .venv/bin/python bench/peers_compare.py [--n 1000000] [--users 20000] [--wait-ms 30000]
        [--workers 1] [--repeat 1] [--peers quix[,raw-cl]]
        [--live 0.5,0.9 [--live-seconds 30] [--live-wait-ms 2000] [--join]]

Catch-up (always first): starts the embedded broker, produces the peers' deterministic input with
their gen.py (seed 42: add_to_cart / charged, event time = 2026-01-01 + i ms), runs `--workers`
`nudgeflow run` processes with the same job as a journey file (enter on add_to_cart, a newer cart
restarts, Charged converts and exits, push after the wait), and measures like the peers do:
events/s = N / (first -> last processed input event), CPU seconds and peak RSS of the workers.
Then it reads the push topic back and checks the result against gen.py's closed form: the sends
whose due time is within the partition's final event time (the peers' rule; nudgeflow also sends
the rest, later, by the wall clock) must equal expected_sends, each key once, and conversions
must equal expected_conversions.

Live (`--live 0.5,0.9`): for each fraction f, fresh workers, then input produced while they run at
f x the catch-up rate for `--live-seconds`, with event time = the wall clock; `--join` starts the
second of two workers half way (a rebalance mid-stream). Reports the lateness of each send (the
push's Kafka timestamp minus its due time: event in, timer fired, send request out) at p50/p99,
CPU seconds per event, and checks exactness against the same closed form on what was produced.

`--peers quix` (or `quix,raw-cl`) runs the peer benchmark's own runner before each catch-up run
and once after the last, so each nudgeflow run has a Quix run just before and just after it (this
VM's speed drifts within minutes: a ratio is only meaningful between neighbours); each catch-up
run then carries `vs_quix` [before, after]. Like the peers' runner, every catch-up run has a broker
of its own with the input produced afresh (one broker for all of them kept each run's changelog
and sends, GBs in memory, for the next).

Prints a table row per run and, last, `RESULT {json}` with every run; exit status 1 on a mismatch.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import orjson
from confluent_kafka import Producer
from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from nudgeflow.broker import EmbeddedBroker, die_with_parent, ensure_topics, free_port, read_to_end  # noqa: E402
from nudgeflow.streams.topics import Topics  # noqa: E402
from nudgeflow.worker import all_topics  # noqa: E402

PEERS = ROOT.parent / "shared" / "peers"
PARTITIONS = 4
JOURNEY = """\
journey: peers-cart
name: the peer benchmark's cart job
entry:
  event: add_to_cart
  while_active: restart
goal:
  event: charged
exit_when:
  - event: charged
steps:
  wait:
    wait: {wait_ms}ms
  push:
    send: push
    title: "{{{{ trigger.product }}}}"
"""


def metrics(port: int) -> dict[str, float]:
    try:
        text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=2).text
    except httpx.HTTPError:
        return {}
    out: dict[str, float] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            key = s.name + ("" if s.name != "nudgeflow_events_consumed_total" else ":" + s.labels["topic"])
            out[key] = out.get(key, 0.0) + s.value
    return out


def read_all(bootstrap: str, topic: str) -> list[Any]:
    """Every message of a topic, to each partition's end."""
    return read_to_end(bootstrap, topic, PARTITIONS)


def proc_stats(pid: int) -> tuple[float, float]:
    """(CPU seconds, peak RSS MiB) of a running process."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        status = Path(f"/proc/{pid}/status").read_text().splitlines()
    except OSError:  # gone
        return 0.0, 0.0
    cpu = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    hwm = next((line for line in status if line.startswith("VmHWM")), "VmHWM: 0 kB")  # none while exec'ing
    return cpu, int(hwm.split()[1]) / 1024


@dataclass
class Workers:
    """`nudgeflow run` processes of one consumer group."""

    broker: EmbeddedBroker
    work: Path
    tag: str
    wait_ms: int
    batch: int
    prefix: str = ""
    procs: list[tuple[subprocess.Popen[bytes], int]] = field(default_factory=list)

    def start_one(self) -> None:
        i = len(self.procs)
        jdir = self.work / f"journeys-{self.tag}"
        jdir.mkdir(exist_ok=True)
        (jdir / "cart.yaml").write_text(JOURNEY.format(wait_ms=self.wait_ms))
        port = free_port()
        env = {
            **os.environ,
            "NUDGEFLOW_BROKER": f"kafka://{self.broker.bootstrap}",
            "NUDGEFLOW_APP_ID": f"bench-{self.tag}",
            "NUDGEFLOW_TOPIC_PREFIX": self.prefix,
            "NUDGEFLOW_DATA_DIR": str(self.work / f"data-{self.tag}-{i}"),
            "NUDGEFLOW_JOURNEYS": json.dumps([str(jdir)]),
            "NUDGEFLOW_METRICS_PORT": str(port),
            "NUDGEFLOW_SESSION_TIMEOUT_S": "6",
            "NUDGEFLOW_REBALANCE_TIMEOUT_S": "6",
            "NUDGEFLOW_HEARTBEAT_S": "1",
            "NUDGEFLOW_BATCH_MAX": str(self.batch),
            "NUDGEFLOW_LOG_FILE": str(self.work / f"worker-{self.tag}-{i}.log"),
        }
        proc = subprocess.Popen(
            [sys.executable, "-m", "nudgeflow.cli", "run"],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=open(self.work / f"worker-{self.tag}-{i}.err", "wb"),  # noqa: SIM115 - the child keeps it
            preexec_fn=die_with_parent,
        )
        self.procs.append((proc, port))

    def check_alive(self) -> None:
        for proc, _ in self.procs:
            if proc.poll() is not None:
                raise SystemExit(f"worker exited {proc.returncode}; see {self.work}")

    def metrics(self) -> dict[str, float]:
        total: Counter[str] = Counter()
        for _, port in self.procs:
            total.update(metrics(port))
        return dict(total)

    def consumed(self) -> float:
        m = self.metrics()
        return m.get("nudgeflow_events_consumed_total:add_to_cart", 0) + m.get(
            "nudgeflow_events_consumed_total:charged", 0
        )

    def ready(self) -> bool:
        return all(any(k == "nudgeflow_pending_timers" for k in metrics(port)) for _, port in self.procs) and bool(
            self.procs
        )

    def stats(self) -> tuple[float, float]:
        cpu = rss = 0.0
        for proc, _ in self.procs:
            c, r = proc_stats(proc.pid)
            cpu, rss = cpu + c, max(rss, r)
        return cpu, rss

    def settle(self, quiet_s: float = 2.0, timeout: float = 120.0) -> dict[str, float]:
        """Wait until every timer has fired (once the input is read to its end, the workers fire
        what is left by the wall clock, which is long past the input's event times) and no more
        sends are made, then the metrics. Sends alone pause for a second or two while the workers
        find their inputs quiet: waiting only for them to pause cut runs short."""
        last, since, deadline = -1.0, time.monotonic(), time.monotonic() + timeout
        while time.monotonic() < deadline:
            m = self.metrics()
            n = m.get("nudgeflow_send_requests_total", 0)
            if n != last:
                last, since = n, time.monotonic()
            elif time.monotonic() - since >= quiet_s and m.get("nudgeflow_pending_timers", 1) == 0:
                return m
            time.sleep(0.25)
        m = self.metrics()
        pending = m.get("nudgeflow_pending_timers")
        print(f"settle: timed out after {timeout:.0f} s with {pending} timers pending", flush=True)
        return m

    def stop(self) -> None:
        for proc, _ in self.procs:
            proc.terminate()
        for proc, _ in self.procs:
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()


def wait_until(pred: Any, timeout: float, every: float = 0.25) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(every)
    return False


def expected(events: dict[str, list[tuple[int, bool]]], part: dict[str, int], wait_ms: int) -> tuple[int, int]:
    """gen.py's closed form (see ../shared/peers/README.md) over the events actually produced."""
    final_wm: dict[int, int] = defaultdict(int)
    for user, evs in events.items():
        final_wm[part[user]] = max(final_wm[part[user]], max(ts for ts, _ in evs))
    sends = conversions = 0
    for user, evs in events.items():
        evs = sorted(evs, key=lambda e: (e[0], not e[1]))  # equal times: add_to_cart first (topic order)
        for i, (ts, add) in enumerate(evs):
            nxt = evs[i + 1][0] if i + 1 < len(evs) else None
            if add:
                d = ts + wait_ms
                if (nxt is not None and nxt >= d) or (nxt is None and final_wm[part[user]] >= d):
                    sends += 1
            elif i and evs[i - 1][1] and ts < evs[i - 1][0] + wait_ms:
                conversions += 1
    return sends, conversions


def check(pushes: list[Any], final_wm: dict[int, int], part: dict[str, int]) -> tuple[int, int, int]:
    """(sends by the peers' rule, sends in all, distinct keys) of the push topic."""
    bodies = [orjson.loads(m.value()) for m in pushes]
    in_window = sum(1 for b in bodies if b["created_at"] <= final_wm[part[b["user_id"]]])
    return in_window, len(bodies), len({b["key"] for b in bodies})


def produce_input(broker: EmbeddedBroker, work: Path, a: argparse.Namespace) -> dict[str, Any]:
    """The peers' input, produced once by their gen.py, and what the check needs of it."""
    topics = Topics()
    ensure_topics(broker.bootstrap, all_topics(topics), PARTITIONS, 604_800_000, copartitioned=topics.inputs)
    manifest = work / "manifest.json"
    cmd = ["gen.py", "--broker", broker.bootstrap, "--n", str(a.n), "--users", str(a.users)]
    cmd += ["--wait-ms", str(a.wait_ms), "--manifest", str(manifest)]
    subprocess.run([sys.executable, *cmd], cwd=PEERS, check=True, stdout=subprocess.DEVNULL)
    m = json.loads(manifest.read_text())
    inputs = read_all(broker.bootstrap, "add_to_cart") + read_all(broker.bootstrap, "charged")
    m["part"] = {x.key().decode(): x.partition() for x in inputs}
    final_wm: dict[int, int] = defaultdict(int)
    for x in inputs:
        final_wm[x.partition()] = max(final_wm[x.partition()], orjson.loads(x.value())["ts"])
    m["final_wm"] = dict(final_wm)
    return m


def catch_up(broker: EmbeddedBroker, work: Path, a: argparse.Namespace, m: dict[str, Any], rep: int) -> dict[str, Any]:
    push_topic = Topics().channel("push")
    # where this run's sends begin, per partition (the topic holds the earlier runs' sends too)
    push_before: dict[int, int] = {}
    for x in read_all(broker.bootstrap, push_topic):
        push_before[x.partition()] = max(push_before.get(x.partition(), 0), x.offset() + 1)
    w = Workers(broker, work, f"c{rep}-{int(time.time())}", a.wait_ms, a.batch)
    for _ in range(a.workers):
        w.start_one()
    first = last = None
    cpu = rss = 0.0
    progress, progress_at = -1.0, time.perf_counter()
    try:
        while True:
            w.check_alive()
            done, now = w.consumed(), time.perf_counter()
            if done and first is None:
                first = now
            if done >= a.n:
                last = now
                cpu, rss = w.stats()
                break
            if done != progress:
                progress, progress_at = done, now
            elif now - progress_at > 120:
                raise SystemExit(f"no progress for 120 s at {done:,.0f} of {a.n:,} events; see {work}")
            time.sleep(0.25)
        mx = w.settle()
    finally:
        w.stop()
    assert first is not None and last is not None
    if last <= first:  # every event was processed between two looks at the worker's metrics
        raise SystemExit(f"--n {a.n:,} is too few events to time (all processed within 0.25 s): use --n 100000 or more")
    pushes = [x for x in read_all(broker.bootstrap, push_topic) if x.offset() >= push_before.get(x.partition(), 0)]
    in_window, total, keys = check(pushes, m["final_wm"], m["part"])
    conversions = int(mx.get("nudgeflow_journey_conversions_total", 0))
    exact = in_window == m["expected_sends"] and keys == total and conversions == m["expected_conversions"]
    return {
        "mode": "catch-up",
        "workers": a.workers,
        "events": a.n,
        "eps": round(a.n / (last - first)),
        "secs": round(last - first, 2),
        "cpu_s": round(cpu, 1),
        "cpu_us_per_event": round(cpu / a.n * 1e6, 1),
        "rss_mib": round(rss),
        "sends": in_window,
        "sends_total": total,
        "keys": keys,
        "conversions": conversions,
        "expected_sends": m["expected_sends"],
        "expected_conversions": m["expected_conversions"],
        "exact": exact,
    }


def live(broker: EmbeddedBroker, work: Path, a: argparse.Namespace, rate: float, tag: str) -> dict[str, Any]:
    topics = Topics(f"{tag}.")
    ensure_topics(broker.bootstrap, all_topics(topics), PARTITIONS, 604_800_000, copartitioned=topics.inputs)
    w = Workers(broker, work, f"{tag}-{int(time.time())}", a.live_wait_ms, a.batch, topics.prefix)
    n_workers = 2 if a.join else a.workers
    w.start_one()
    if not a.join:
        for _ in range(n_workers - 1):
            w.start_one()
    if not wait_until(w.ready, 90):
        raise SystemExit(f"workers not ready; see {work}")
    events: dict[str, list[tuple[int, bool]]] = defaultdict(list)
    part: dict[str, int] = {}
    failed: list[Any] = []

    def delivered(err: Any, msg: Any) -> None:
        if err:
            failed.append(err)
        else:
            part[msg.key().decode()] = msg.partition()

    producer = Producer(
        {
            "bootstrap.servers": broker.bootstrap,
            "partitioner": "murmur2_random",
            "enable.idempotence": True,
            "linger.ms": 5,
            "log_level": 3,
        }
    )
    rng = random.Random(7)
    n_total = int(rate * a.live_seconds)
    cpu0 = w.stats()[0]
    t0 = time.perf_counter()
    joined = False
    last_ts = 0
    for i in range(n_total):
        due = t0 + i / rate
        while (now := time.perf_counter()) < due:
            time.sleep(min(0.002, due - now))
        if a.join and not joined and i >= n_total // 2:
            threading.Thread(target=w.start_one).start()
            joined = True
        user = f"u{rng.randrange(a.users):05d}"
        add = rng.random() < 0.7
        ts = last_ts = max(int(time.time() * 1000), last_ts)  # each partition in time order
        topic = "add_to_cart" if add else "charged"
        ev = {"user_id": user, "event": topic, "ts": ts, "props": {"product": f"sku{rng.randrange(1000):04d}"}}
        events[user].append((ts, add))
        while True:
            try:
                producer.produce(topics.name(topic), orjson.dumps(ev), user, timestamp=ts, on_delivery=delivered)
                break
            except BufferError:
                producer.poll(0.01)
        if i % 500 == 0:
            producer.poll(0)
    producer.flush(60)
    produce_s = time.perf_counter() - t0
    assert not failed, failed[:3]
    if not wait_until(lambda: w.consumed() >= n_total, 300):
        raise SystemExit(f"live run: the workers did not consume all input; see {work}")
    cpu = w.stats()[0] - cpu0
    mx = w.settle(quiet_s=max(3.0, a.live_wait_ms / 1000 + 2))
    w.stop()
    pushes = read_all(broker.bootstrap, topics.channel("push"))
    final_wm: dict[int, int] = defaultdict(int)
    for user, evs in events.items():
        final_wm[part[user]] = max(final_wm[part[user]], max(t for t, _ in evs))
    in_window, total, keys = check(pushes, final_wm, part)
    late = sorted(
        (m.timestamp()[1] - orjson.loads(m.value())["created_at"]) / 1000
        for m in pushes
        if orjson.loads(m.value())["created_at"] <= final_wm[part[m.key().decode()]]
    )
    exp_sends, exp_conv = expected(events, part, a.live_wait_ms)
    with (work / f"{tag}-events.jsonl").open("wb") as f:  # for a closer look at a mismatch
        for user, evs in events.items():
            f.write(orjson.dumps({"user": user, "p": part[user], "events": evs}) + b"\n")
    with (work / f"{tag}-pushes.jsonl").open("wb") as f:
        for m in pushes:
            f.write(m.value() + b"\n")
    conversions = int(mx.get("nudgeflow_journey_conversions_total", 0))

    def pct(q: float) -> float:
        return round(late[min(len(late) - 1, int(q * len(late)))], 3) if late else float("nan")

    return {
        "mode": "live" + (" join" if a.join else ""),
        "workers": n_workers,
        "events": n_total,
        "rate": round(rate),
        "achieved_rate": round(n_total / produce_s),
        "lateness_p50_s": pct(0.5),
        "lateness_p99_s": pct(0.99),
        "lateness_max_s": round(late[-1], 3) if late else None,
        "cpu_s": round(cpu, 1),
        "cpu_us_per_event": round(cpu / n_total * 1e6, 1),
        "sends": in_window,
        "sends_total": total,
        "keys": keys,
        "conversions": conversions,
        "expected_sends": exp_sends,
        "expected_conversions": exp_conv,
        "exact": in_window == exp_sends and keys == total and conversions == exp_conv,
    }


def show_peers(rows: list[dict[str, Any]], into: list[dict[str, Any]]) -> None:
    for p in rows:
        into.append(p)
        print(
            f"| peer: {p['impl']} | 1 | | {p['eps']:,} | {p['cpu_us_per_event']} | {p['rss_mib']} | | | {p['exact']} |",
            flush=True,
        )


def peer_runs(a: argparse.Namespace, work: Path, tag: str) -> list[dict[str, Any]]:
    """One run of the peer benchmark's jobs (`--peers`, e.g. quix) by its own runner, with its own
    broker and a fresh copy of the same input: their RESULT lines, each with the job's events/s
    and CPU seconds (wait4 rusage)."""
    cmd = [str(PEERS / "run.sh"), "--n", str(a.n), "--users", str(a.users), "--wait-ms", str(a.wait_ms)]
    cmd += ["--impls", a.peers, "--workdir", str(work / f"peers-{tag}")]
    done = subprocess.run(cmd, cwd=PEERS, capture_output=True, text=True, check=False)
    rows = [json.loads(line) for line in done.stdout.splitlines() if line.startswith('{"impl"')]
    if done.returncode != 0 or len(rows) != len(a.peers.split(",")):
        tail = done.stdout[-2000:] + done.stderr[-2000:]
        raise SystemExit(f"the peer benchmark failed (exit {done.returncode}):\n{tail}")
    return [
        {
            "impl": r["name"],
            "eps": r["eps"],
            "cpu_us_per_event": round(r["job_cpu"] / r["events"] * 1e6, 1),
            "rss_mib": round(r["rss_mb"]),
            "exact": r["sends"] == r["out_keys"] == r["out_msgs"] and r["disorder"] == 0,
        }
        for r in rows
    ]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=200_000)
    ap.add_argument("--users", type=int, default=20_000)
    ap.add_argument("--wait-ms", type=int, default=30_000)
    ap.add_argument("--batch", type=int, default=20_000)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--live", default="", help="fractions of the catch-up rate to run live at, e.g. 0.5,0.9")
    ap.add_argument("--live-seconds", type=float, default=30.0)
    ap.add_argument("--live-wait-ms", type=int, default=2000)
    ap.add_argument("--join", action="store_true", help="live: a second worker joins half way")
    ap.add_argument(
        "--peers",
        default="",
        help="peer jobs to run before each catch-up run and after the last (e.g. quix or quix,raw-cl), "
        "by ../shared/peers/run.sh: each nudgeflow run is compared with the Quix runs beside it",
    )
    a = ap.parse_args()
    if not (PEERS / "gen.py").exists():
        raise SystemExit(f"the peer benchmark is not at {PEERS}")
    work = Path(tempfile.mkdtemp(prefix="nudgeflow-bench-"))
    runs: list[dict[str, Any]] = []
    peers: list[dict[str, Any]] = []
    print(f"N={a.n}, U={a.users}, wait={a.wait_ms} ms, workers={a.workers}, batch={a.batch}; logs in {work}\n")
    print("| mode | workers | events | events/s | CPU µs/event | peak RSS MiB | lateness p50/p99 s | sends | exact |")
    print("|---|--:|--:|--:|--:|--:|--:|--:|---|")
    for rep in range(1, a.repeat + 1):
        if a.peers:
            show_peers(peer_runs(a, work, str(rep)), peers)
        # each run on a broker of its own with the input produced afresh, as the peers' runner does:
        # a broker that kept the earlier runs' changelogs and sends (GBs in memory) is not the same
        with EmbeddedBroker(log_path=work / f"tansu-{rep}.log") as broker:
            r = catch_up(broker, work, a, produce_input(broker, work, a), rep)
        runs.append(r)
        print(
            f"| catch-up | {r['workers']} | {r['events']:,} | {r['eps']:,} | {r['cpu_us_per_event']} | "
            f"{r['rss_mib']} | | {r['sends']} / {r['expected_sends']} | {r['exact']} |",
            flush=True,
        )
    if a.peers:
        show_peers(peer_runs(a, work, "last"), peers)
        quix = [p["eps"] for p in peers if p["impl"] == "quix"]
        for i, r in enumerate(runs):  # against the Quix run just before and just after it
            if len(quix) > i + 1:
                r["vs_quix"] = [round(r["eps"] / quix[i], 2), round(r["eps"] / quix[i + 1], 2)]
                print(f"catch-up run {i + 1}: {r['vs_quix'][0]}x / {r['vs_quix'][1]}x Quix (the runs beside it)")
    max_rate = statistics.median(r["eps"] for r in runs)
    fractions = [float(x) for x in a.live.split(",") if x]
    if fractions:  # live runs: one more broker of their own
        with EmbeddedBroker(log_path=work / "tansu-live.log") as broker:
            for i, f in enumerate(fractions):
                r = live(broker, work, a, max_rate * f, f"l{i}")
                runs.append({**r, "fraction": f})
                print(
                    f"| {r['mode']} @ {f:.0%} ({r['rate']:,}/s) | {r['workers']} | {r['events']:,} | "
                    f"{r['achieved_rate']:,} | {r['cpu_us_per_event']} | | {r['lateness_p50_s']} / "
                    f"{r['lateness_p99_s']} | {r['sends']} / {r['expected_sends']} | {r['exact']} |",
                    flush=True,
                )
    ok = all(r["exact"] for r in runs) and all(p["exact"] for p in peers)
    print("\nOK: every run matches the expected result" if ok else "\nFAILED: see the rows above")
    result = {"n": a.n, "users": a.users, "wait_ms": a.wait_ms, "runs": runs, "peers": peers}
    print("RESULT " + json.dumps(result), flush=True)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
