"""nudgeflow as one more job of the peer benchmark (../shared/peers): same input, same expectation.

    .venv/bin/python bench/peers_compare.py [--n 200000] [--users 20000] [--wait-ms 30000]

Starts the embedded broker, produces the peers' deterministic input with their gen.py (seed 42:
add_to_cart / charged, event time = 2026-01-01 + i ms), runs `nudgeflow run` with the same job as
a journey file (enter on add_to_cart, a newer cart restarts, Charged converts and exits, push after
the wait), and measures like the peers do: events/s = N / (first -> last processed input event),
job CPU and peak RSS of the worker, wall time. Then it reads the push topic back and checks the
result against gen.py's closed form: the sends whose due time is within the partition's final
event time (the peers' rule; nudgeflow also sends the rest, later, by the wall clock) must equal
expected_sends, each key once, and conversions must equal expected_conversions.
Prints one table row per run; exit status 1 on any mismatch.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import httpx
import orjson
from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, TopicPartition
from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from nudgeflow.broker import EmbeddedBroker, die_with_parent, ensure_topics, free_port  # noqa: E402
from nudgeflow.streams.topics import Topics  # noqa: E402
from nudgeflow.worker import all_topics  # noqa: E402

PEERS = ROOT.parent / "shared" / "peers"
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


def read_all(bootstrap: str, topics: list[str], partitions: int = 4) -> list:  # type: ignore[type-arg]
    c = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"bench-read-{time.time()}",
            "enable.auto.commit": False,
            "enable.partition.eof": True,
            "log_level": 3,
        }
    )
    c.assign([TopicPartition(t, p, OFFSET_BEGINNING) for t in topics for p in range(partitions)])
    got, eof = [], set()
    deadline = time.time() + 120
    while len(eof) < len(topics) * partitions and time.time() < deadline:
        for m in c.consume(5000, timeout=0.5):
            if m.error() is None:
                got.append(m)
            elif m.error().code() == KafkaError._PARTITION_EOF:
                eof.add((m.topic(), m.partition()))
    c.close()
    return got


def proc_stats(pid: int) -> tuple[float, float]:
    """(CPU seconds, peak RSS MiB) of a running process."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    cpu = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    hwm = next(line for line in Path(f"/proc/{pid}/status").read_text().splitlines() if line.startswith("VmHWM"))
    return cpu, int(hwm.split()[1]) / 1024


def run_once(broker: EmbeddedBroker, work: Path, manifest: dict, wait_ms: int, batch: int, rep: int) -> dict:  # type: ignore[type-arg]
    port = free_port()
    jdir = work / f"journeys-{rep}"
    jdir.mkdir(exist_ok=True)
    (jdir / "cart.yaml").write_text(JOURNEY.format(wait_ms=wait_ms))
    env = {
        **os.environ,
        "NUDGEFLOW_BROKER": f"kafka://{broker.bootstrap}",
        "NUDGEFLOW_APP_ID": f"bench-{rep}-{int(time.time())}",
        "NUDGEFLOW_DATA_DIR": str(work / f"data-{rep}"),
        "NUDGEFLOW_JOURNEYS": json.dumps([str(jdir)]),
        "NUDGEFLOW_METRICS_PORT": str(port),
        "NUDGEFLOW_SESSION_TIMEOUT_S": "6",
        "NUDGEFLOW_REBALANCE_TIMEOUT_S": "6",
        "NUDGEFLOW_HEARTBEAT_S": "1",
        "NUDGEFLOW_BATCH_MAX": str(batch),
        "NUDGEFLOW_LOG_FILE": str(work / f"worker-{rep}.log"),
    }
    # each run writes to its own push topic: give it a fresh prefix for the outputs only
    t_start = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-m", "nudgeflow.cli", "run"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=open(work / f"worker-{rep}.err", "wb"),  # noqa: SIM115 - the child keeps it
        preexec_fn=die_with_parent,
    )
    n = manifest["n"]
    first = last = None
    cpu = rss = 0.0
    try:
        while True:
            if proc.poll() is not None:
                raise SystemExit(f"worker exited {proc.returncode}; see {work}")
            m = metrics(port)
            done = m.get("nudgeflow_events_consumed_total:add_to_cart", 0) + m.get(
                "nudgeflow_events_consumed_total:charged", 0
            )
            now = time.perf_counter()
            if done and first is None:
                first = now
            if done >= n:
                last = now
                cpu, rss = proc_stats(proc.pid)
                break
            if now - t_start > 900:
                raise SystemExit("timeout: not all events processed in 15 minutes")
            time.sleep(0.1)
        time.sleep(3)  # let the last timers fire and flush
        m = metrics(port)
    finally:
        proc.terminate()
        proc.wait(30)
    assert first is not None and last is not None
    return {
        "eps": round(n / (last - first)),
        "secs": last - first,
        "wall": last - t_start,
        "cpu": cpu,
        "rss": rss,
        "conversions": int(m.get("nudgeflow_journey_conversions_total", 0)),
        "sends_total": int(m.get("nudgeflow_send_requests_total", 0)),
        "batch_mean": m.get("nudgeflow_batch_size_sum", 0) / max(1, m.get("nudgeflow_batch_size_count", 1)),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=200_000)
    ap.add_argument("--users", type=int, default=20_000)
    ap.add_argument("--wait-ms", type=int, default=30_000)
    ap.add_argument("--batch", type=int, default=1000)
    ap.add_argument("--repeat", type=int, default=1)
    a = ap.parse_args()
    if not (PEERS / "gen.py").exists():
        raise SystemExit(f"the peer benchmark is not at {PEERS}")
    work = Path(tempfile.mkdtemp(prefix="nudgeflow-bench-"))
    ok = True
    with EmbeddedBroker(log_path=work / "tansu.log") as broker:
        ensure_topics(broker.bootstrap, all_topics(Topics()), 4, 604_800_000, copartitioned=Topics().inputs)
        subprocess.run(
            [
                sys.executable,
                "gen.py",
                "--broker",
                broker.bootstrap,
                "--n",
                str(a.n),
                "--users",
                str(a.users),
                "--wait-ms",
                str(a.wait_ms),
                "--manifest",
                str(work / "manifest.json"),
            ],
            cwd=PEERS,
            check=True,
            stdout=subprocess.DEVNULL,
        )
        manifest = json.loads((work / "manifest.json").read_text())
        inputs = read_all(broker.bootstrap, ["add_to_cart", "charged"])
        part = {m.key(): m.partition() for m in inputs}
        final_wm = Counter()  # type: Counter[int]
        for m in inputs:
            final_wm[m.partition()] = max(final_wm[m.partition()], orjson.loads(m.value())["ts"])
        print(
            f"N={a.n} ({manifest['adds']} add_to_cart, {manifest['charged']} charged), U={a.users}, "
            f"wait={a.wait_ms} ms; expected sends={manifest['expected_sends']}, "
            f"conversions={manifest['expected_conversions']}\n"
        )
        print(
            "| run | events/s | first→last s | wall s | worker CPU s | peak RSS MiB | mean batch | sends (peers' rule) "
            "| sends total | distinct keys | conversions |"
        )
        print("|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|")
        for rep in range(1, a.repeat + 1):
            push_before = len(read_all(broker.bootstrap, ["nudgeflow.send.push"]))
            r = run_once(broker, work, manifest, a.wait_ms, a.batch, rep)
            pushes = read_all(broker.bootstrap, ["nudgeflow.send.push"])[push_before:]
            bodies = [orjson.loads(m.value()) for m in pushes]
            keys = Counter(b["key"] for b in bodies)
            in_window = sum(1 for b in bodies if b["created_at"] <= final_wm[part[b["user_id"].encode()]])
            print(
                f"| {rep} | {r['eps']:,} | {r['secs']:.1f} | {r['wall']:.1f} | {r['cpu']:.1f} | {r['rss']:.0f} "
                f"| {r['batch_mean']:.0f} | {in_window} | {len(bodies)} | {len(keys)} | {r['conversions']} |",
                flush=True,
            )
            good = (
                in_window == manifest["expected_sends"]
                and len(keys) == len(bodies)
                and r["conversions"] == manifest["expected_conversions"]
            )
            if not good:
                ok = False
                print(f"MISMATCH in run {rep}: {r}")
    print("\nOK: nudgeflow matches the peers' expected result" if ok else "\nFAILED: see above")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
