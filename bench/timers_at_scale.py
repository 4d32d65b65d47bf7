"""Durable timers at scale: 1,000,000 pending timers in one worker, 100,000 firing within a minute.

    .venv/bin/python bench/timers_at_scale.py [--pending 900000] [--due 100000] [--partitions 8]
        [--live-rate 10000]

1. Loads `--pending` users, each with a pending timer due in a day, straight into the journey
   state changelog (the same bytes the worker writes: one user record each).
2. Starts one worker with an empty data dir: it restores them from the changelog in bulk and
   rebuilds the timer index from the records (restore time: start to all timers indexed).
3. Produces `--due` add_to_cart events; each user's 60-second wait falls due within about a minute,
   while live traffic (`--live-rate` charged events/s from a pool of other users) keeps the
   worker ingesting. Lateness of each fired timer = the push's Kafka timestamp minus its due
   time (created_at).
4. Restarts the worker with the data dir wiped: the restore time of every user it now holds.
Prints p50 / p99 / max lateness, fire rate, ingest rate, peak RSS, on-disk size and restore times.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import orjson
from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic
from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from nudgeflow.agents.keys import user_key  # noqa: E402
from nudgeflow.broker import EmbeddedBroker, die_with_parent, ensure_topics, free_port  # noqa: E402
from nudgeflow.engine.core import process  # noqa: E402
from nudgeflow.engine.io import Event  # noqa: E402
from nudgeflow.engine.loader import load_journeys  # noqa: E402
from nudgeflow.streams.topics import Topics  # noqa: E402
from nudgeflow.worker import all_topics  # noqa: E402

JOURNEY = """\
journey: bench-timers
name: wait a minute, then push
entry: {event: add_to_cart}
exit_when: [{event: charged}]
steps:
  wait_a_minute: {wait: 60s}
  push: {send: push, title: "{{ trigger.product }}"}
"""
APP = "bench-timers"


def murmur2_partition(key: bytes, partitions: int) -> int:
    """Kafka's default (Java) partitioner, as librdkafka's murmur2_random computes it."""
    m, length = 0x5BD1E995, len(key)
    h = (0x9747B28C ^ length) & 0xFFFFFFFF
    for i in range(length // 4):
        k = int.from_bytes(key[i * 4 : i * 4 + 4], "little")
        k = (k * m) & 0xFFFFFFFF
        k ^= k >> 24
        k = (k * m) & 0xFFFFFFFF
        h = ((h * m) & 0xFFFFFFFF) ^ k
    tail, rest = length & ~3, length % 4
    if rest == 3:
        h ^= key[tail + 2] << 16
    if rest >= 2:
        h ^= key[tail + 1] << 8
    if rest >= 1:
        h ^= key[tail]
        h = (h * m) & 0xFFFFFFFF
    h ^= h >> 13
    h = (h * m) & 0xFFFFFFFF
    h ^= h >> 15
    return (h & 0x7FFFFFFF) % partitions


def metrics(port: int) -> dict[str, float]:
    try:
        text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    except httpx.HTTPError:
        return {}
    out: dict[str, float] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[s.name] = out.get(s.name, 0.0) + s.value
    return out


def peak_rss_mib(pid: int) -> float:
    line = next(x for x in Path(f"/proc/{pid}/status").read_text().splitlines() if x.startswith("VmHWM"))
    return int(line.split()[1]) / 1024


def du_mib(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 2**20


def producer(bootstrap: str) -> Producer:
    return Producer(
        {
            "bootstrap.servers": bootstrap,
            "linger.ms": 50,
            "batch.num.messages": 10000,
            "queue.buffering.max.messages": 1_000_000,
            "enable.idempotence": True,
            "log_level": 3,
            "partitioner": "murmur2_random",
        }
    )


def produce(p: Producer, topic: str, key: bytes, value: bytes | None, partition: int | None = None) -> None:
    kw = {"partition": partition} if partition is not None else {}
    while True:
        try:
            p.produce(topic, key=key, value=value, **kw)
            return
        except BufferError:
            p.poll(0.05)


def check_partitioner(bootstrap: str, partitions: int) -> None:
    got: dict[bytes, int] = {}
    p = producer(bootstrap)
    for i in range(200):
        key = f"user-{i * 7919}".encode()
        p.produce(
            "nudgeflow.dead_letter",
            key=key,
            value=b"x",
            on_delivery=lambda e, m: got.__setitem__(m.key(), m.partition()),
        )
    p.flush(30)
    bad = [k for k, part in got.items() if murmur2_partition(k, partitions) != part]
    assert not bad and len(got) == 200, f"murmur2 mismatch for {bad[:3]}"


def wait_metric(port: int, name: str, target: float, timeout: float, proc: subprocess.Popen[bytes]) -> float:
    t = time.monotonic()
    while time.monotonic() - t < timeout:
        if proc.poll() is not None:
            raise SystemExit(f"worker exited {proc.returncode}")
        if metrics(port).get(name, 0) >= target:
            return time.monotonic() - t
        time.sleep(0.5)
    raise SystemExit(f"timeout waiting for {name} >= {target} (at {metrics(port).get(name)})")


def start_worker(bootstrap: str, work: Path, partitions: int, port: int) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        "NUDGEFLOW_BROKER": f"kafka://{bootstrap}",
        "NUDGEFLOW_APP_ID": APP,
        "NUDGEFLOW_DATA_DIR": str(work / "data"),
        "NUDGEFLOW_JOURNEYS": json.dumps([str(work / "journeys")]),
        "NUDGEFLOW_METRICS_PORT": str(port),
        "NUDGEFLOW_PARTITIONS": str(partitions),
        "NUDGEFLOW_SESSION_TIMEOUT_S": "6",
        "NUDGEFLOW_REBALANCE_TIMEOUT_S": "6",
        "NUDGEFLOW_HEARTBEAT_S": "1",
        "NUDGEFLOW_TIMER_INTERVAL_MS": "100",
        "NUDGEFLOW_LOG_FILE": str(work / "worker.log"),
    }
    return subprocess.Popen(
        [sys.executable, "-m", "nudgeflow.cli", "run"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=open(work / "worker.err", "ab"),
        preexec_fn=die_with_parent,
    )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pending", type=int, default=900_000)
    ap.add_argument("--due", type=int, default=100_000)
    ap.add_argument("--partitions", type=int, default=8)
    ap.add_argument("--live-rate", type=float, default=10_000)
    ap.add_argument("--live-users", type=int, default=200_000)
    a = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="nudgeflow-timers-"))
    (work / "journeys").mkdir()
    (work / "journeys" / "bench.yaml").write_text(JOURNEY)
    js = load_journeys([work / "journeys"])
    topics, n = Topics(), a.partitions
    with EmbeddedBroker(log_path=work / "tansu.log") as broker:
        bs = broker.bootstrap
        ensure_topics(bs, all_topics(topics), n, 604_800_000, copartitioned=topics.inputs)
        changelog = f"{APP}-journey-state-changelog"
        cfg = {"retention.ms": "604800000", "cleanup.policy": "compact"}
        admin = AdminClient({"bootstrap.servers": bs, "log_level": 3})  # keep a reference until done
        for f in admin.create_topics([NewTopic(changelog, n, 1, config=cfg)]).values():
            f.result(30)
        check_partitioner(bs, n)

        # 1. load pending timers into the changelog
        now = int(time.time() * 1000)
        tpl = process(None, Event("TEMPLATE", "add_to_cart", now, {"product": "sku"}), now, js).state
        tpl["instances"]["bench-timers"]["wake"] = 1_111_111_111_111_111
        raw = orjson.dumps({"state": tpl, "offsets": {}})
        t = time.perf_counter()
        p = producer(bs)
        for i in range(a.pending):
            user = f"p{i:07d}"
            part = murmur2_partition(user.encode(), n)
            due = now + 86_400_000 + i
            produce(p, changelog, user_key(user), raw.replace(b"1111111111111111", str(due).encode()), part)
            if i % 10000 == 0:
                p.poll(0)
        p.flush(300)
        load_s = time.perf_counter() - t
        print(f"loaded {a.pending:,} pending timers (changelog records) in {load_s:.1f} s", flush=True)

        # 2. restore into a worker with an empty data dir
        port = free_port()
        worker = start_worker(bs, work, n, port)
        restore1 = wait_metric(port, "nudgeflow_pending_timers", a.pending, 1800, worker)
        print(f"worker start + restore of {a.pending:,} timers: {restore1:.1f} s", flush=True)

        # 3. 100k timers due within a minute, while live traffic flows
        stop = threading.Event()

        live_sent = [0]

        def live() -> None:  # charged events at --live-rate, in 10 ms slices
            lp, k, t0 = producer(bs), 0, time.monotonic()
            while not stop.is_set():
                target = int((time.monotonic() - t0) * a.live_rate)
                now = int(time.time() * 1000)
                while k < target:
                    user = f"live{k % a.live_users}"
                    produce(lp, "charged", user.encode(), orjson.dumps({"user_id": user, "ts": now}))
                    k += 1
                lp.poll(0)
                time.sleep(0.01)
            lp.flush(30)
            live_sent[0] = k

        live_thread = threading.Thread(target=live, daemon=True)
        live_thread.start()
        t_entry = time.monotonic()
        p = producer(bs)
        base = int(time.time() * 1000)
        for i in range(a.due):  # event times spread over a minute: the 60 s waits fall due within one minute
            user = f"d{i:07d}"
            ts = base + i * 60_000 // a.due
            produce(
                p,
                "add_to_cart",
                user.encode(),
                orjson.dumps({"user_id": user, "ts": ts, "props": {"product": f"sku{i}"}}),
            )
            if i % 1000 == 0:
                p.poll(0)
        p.flush(60)
        entered = wait_metric(port, "nudgeflow_journey_entries_total", a.due, 600, worker)
        print(
            f"{a.due:,} entries ingested in {time.monotonic() - t_entry:.1f} s "
            f"(waited {entered:.1f} s after producing)",
            flush=True,
        )
        wait_metric(port, "nudgeflow_send_requests_total", a.due, 900, worker)
        live_s = time.monotonic() - t_entry
        stop.set()
        live_thread.join(30)
        ingested = metrics(port).get("nudgeflow_events_consumed_total", 0)
        rss1, disk = peak_rss_mib(worker.pid), du_mib(work / "data")
        m = metrics(port)

        c = Consumer({"bootstrap.servers": bs, "group.id": "bench-read", "enable.partition.eof": True, "log_level": 3})
        c.assign([TopicPartition(topics.channel("push"), q, OFFSET_BEGINNING) for q in range(n)])
        late, sent_at, eof = [], [], set()
        while len(eof) < n:
            for msg in c.consume(5000, timeout=1):
                if msg.error() is None:
                    created = orjson.loads(msg.value())["created_at"]
                    ts = msg.timestamp()[1]
                    late.append((ts - created) / 1000)
                    sent_at.append(ts)
                elif msg.error().code() == KafkaError._PARTITION_EOF:
                    eof.add(msg.partition())
        c.close()
        late.sort()
        rate = len(sent_at) / max(0.001, (max(sent_at) - min(sent_at)) / 1000)
        worker.terminate()
        worker.wait(60)

        # 4. restore with a wiped data dir
        shutil.rmtree(work / "data")
        port2 = free_port()
        worker = start_worker(bs, work, n, port2)
        restore2 = wait_metric(port2, "nudgeflow_pending_timers", 0.0, 60, worker)  # gauge present
        restore2 = wait_metric(port2, "nudgeflow_pending_timers", a.pending, 1800, worker) + restore2
        rss2 = peak_rss_mib(worker.pid)
        worker.terminate()
        worker.wait(60)

    print("\n| measure | value |\n|---|--:|")
    print(f"| pending timers in one worker ({n} partitions) | {a.pending + a.due:,} at the peak |")
    print(f"| timers fired | {len(late):,} |")
    print(
        f"| live traffic meanwhile | {live_sent[0]:,} charged events in {live_s:.0f} s "
        f"({live_sent[0] / live_s:,.0f}/s asked for {a.live_rate:,.0f}/s); {ingested:,.0f} inputs consumed |"
    )
    print(
        f"| lateness p50 / p99 / max | {statistics.median(late):.3f} / {late[int(len(late) * 0.99) - 1]:.3f} / "
        f"{late[-1]:.3f} s |"
    )
    print(f"| fire rate | {rate:,.0f} timers/s |")
    print(f"| peak RSS (1M pending, firing) | {rss1:.0f} MiB |")
    print(f"| on-disk state (RocksDB) | {disk:.0f} MiB |")
    print(
        f"| restore from changelog, empty data dir ({a.pending:,} timers, start to all indexed) | "
        f"{restore1:.1f} s (first start), {restore2:.1f} s (after wipe) |"
    )
    print(f"| peak RSS during restore | {rss2:.0f} MiB |")
    print(
        f"| duplicate inputs skipped / stale ticks | {m.get('nudgeflow_duplicate_inputs_total', 0):.0f} / "
        f"{m.get('nudgeflow_timers_stale_total', 0):.0f} |"
    )
    print(f"\n(work dir {work}; changelog load {load_s:.1f} s)")


if __name__ == "__main__":
    main()
