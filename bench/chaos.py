"""Chaos check: steady traffic, workers and a sender killed again and again, a frozen broker.

    .venv/bin/python bench/chaos.py [--seconds 240] [--rate 150] [--kills 24] [--freeze 30]

Runs the embedded broker, two `nudgeflow run` workers and one push sender (the webhook provider,
to a local HTTP endpoint that, like real APIs, deduplicates by the Idempotency-Key header and
records what it received). A producer sends carts and purchases at `--rate` events/s for
`--seconds`, with event time = the wall clock, and writes them to events.jsonl. Meanwhile a loop
SIGKILLs a random worker or the sender and restarts it, `--kills` times in all; some kills come
right after a worker restarted (mid-rebalance); once the broker is frozen (SIGSTOP) for
`--freeze` seconds, then resumed. When the traffic is over and everything is quiet, it compares:

- the push topic with `nudgeflow simulate` on the same events: every expected send key there
  (0 lost), no other (0 extra); records written twice for one key are counted (a worker killed
  between producing a batch and recording it produces it again: the sender deduplicates); the
  lost ones go to lost.jsonl (as simulate made them), the extra ones to extra.jsonl (as produced);
- what the endpoint received with the same expected keys: 0 lost, 0 extra, and how many
  deliveries it saw twice for one key (a sender killed between delivering and recording).

Prints a summary and `RESULT {json}`; exit status 1 unless nothing was lost or extra.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import orjson
from confluent_kafka import Producer

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from nudgeflow.broker import EmbeddedBroker, die_with_parent, ensure_topics, read_to_end, stop_process  # noqa: E402
from nudgeflow.streams.topics import Topics  # noqa: E402
from nudgeflow.worker import all_topics  # noqa: E402

PARTITIONS = 4
SIMULATE = [sys.executable, "-m", "nudgeflow.cli", "simulate"]
JOURNEY = """\
journey: chaos-cart
name: cart abandonment under chaos
entry: {event: add_to_cart, while_active: restart}
goal: {event: charged}
exit_when: [{event: charged}]
steps:
  wait: {wait: 5s}
  push: {send: push, title: "{{ trigger.product }}"}
"""


class Endpoint(ThreadingHTTPServer):
    """The push provider's API as the webhook provider calls it: deduplicates by Idempotency-Key."""

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), Handler)
        self.lock = threading.Lock()
        self.received: Counter[str] = Counter()  # idempotency key -> requests

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/push"


class Handler(BaseHTTPRequestHandler):
    server: Endpoint

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("content-length", 0)))
        key = self.headers.get("idempotency-key", "")
        assert orjson.loads(body)["key"] == key
        with self.server.lock:
            self.server.received[key] += 1
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


@dataclass
class Proc:
    """A child process we can kill and start again with the same command and data."""

    name: str
    cmd: list[str]
    env: dict[str, str]
    log: Path
    proc: subprocess.Popen[bytes] | None = None
    kills: int = 0

    def start(self) -> None:
        self.proc = subprocess.Popen(
            self.cmd,
            env=self.env,
            stdout=open(self.log, "ab"),  # noqa: SIM115 - the child keeps it
            stderr=subprocess.STDOUT,
            preexec_fn=die_with_parent,
        )

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()
        self.kills += 1

    def stop(self) -> None:
        if self.proc:
            stop_process(self.proc, 20)


@dataclass
class Traffic:
    """Carts and purchases at a steady rate, event time = the wall clock, each also written to a file."""

    bootstrap: str
    topics: Topics
    out: Path
    rate: float
    seconds: float
    users: int
    produced: int = 0
    failed: list[Any] = field(default_factory=list)

    def run(self) -> None:
        producer = Producer(
            {
                "bootstrap.servers": self.bootstrap,
                "partitioner": "murmur2_random",
                "enable.idempotence": True,
                "linger.ms": 5,
                "message.timeout.ms": 600_000,  # a frozen broker must not lose input
                "log_level": 3,
            }
        )
        rng, t0, last = random.Random(5), time.monotonic(), 0
        with self.out.open("wb") as f:
            for i in range(int(self.rate * self.seconds)):
                while time.monotonic() < t0 + i / self.rate:
                    time.sleep(0.002)
                user = f"c{rng.randrange(self.users):04d}"
                name = "add_to_cart" if rng.random() < 0.7 else "charged"
                ts = last = max(int(time.time() * 1000), last)
                ev = {"user_id": user, "event": name, "ts": ts, "props": {"product": f"sku-{rng.randrange(50)}"}}
                raw = orjson.dumps(ev)
                f.write(raw + b"\n")
                while True:
                    try:
                        producer.produce(self.topics.name(name), raw, user, on_delivery=self._delivered)
                        break
                    except BufferError:
                        producer.poll(0.05)
                producer.poll(0)
                self.produced += 1
        producer.flush(900)

    def _delivered(self, err: Any, msg: Any) -> None:
        if err:
            self.failed.append(err)


def read_topic(bootstrap: str, topic: str) -> list[Any]:
    return read_to_end(bootstrap, topic, PARTITIONS)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=240)
    ap.add_argument("--rate", type=float, default=150)
    ap.add_argument("--users", type=int, default=2000)
    ap.add_argument("--kills", type=int, default=24)
    ap.add_argument("--freeze", type=float, default=30)
    ap.add_argument("--seed", type=int, default=3)
    a = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="nudgeflow-chaos-"))
    (work / "journeys").mkdir()
    (work / "journeys" / "cart.yaml").write_text(JOURNEY)
    rng = random.Random(a.seed)
    endpoint = Endpoint()
    threading.Thread(target=endpoint.serve_forever, daemon=True).start()
    topics = Topics("chaos.")
    print(f"work dir {work}", flush=True)
    with EmbeddedBroker(log_path=work / "tansu.log") as broker:
        ensure_topics(broker.bootstrap, all_topics(topics), PARTITIONS, 86_400_000, copartitioned=topics.inputs)
        base_env = {
            **os.environ,
            "NUDGEFLOW_BROKER": f"kafka://{broker.bootstrap}",
            "NUDGEFLOW_TOPIC_PREFIX": topics.prefix,
            "NUDGEFLOW_APP_ID": "chaos",
            "NUDGEFLOW_PARTITIONS": str(PARTITIONS),
            "NUDGEFLOW_SESSION_TIMEOUT_S": "6",
            "NUDGEFLOW_REBALANCE_TIMEOUT_S": "6",
            "NUDGEFLOW_HEARTBEAT_S": "1",
            "NUDGEFLOW_JOURNEYS": json.dumps([str(work / "journeys")]),
            "NUDGEFLOW_TOPIC_SECRET": "chaos-" + os.urandom(8).hex(),  # signed sends and feedback
        }
        workers = [
            Proc(
                f"worker{i}",
                [sys.executable, "-m", "nudgeflow.cli", "run"],
                {
                    **base_env,
                    "NUDGEFLOW_DATA_DIR": str(work / f"data-w{i}"),
                    "NUDGEFLOW_METRICS_PORT": "0",
                    "NUDGEFLOW_LOG_FILE": str(work / f"worker{i}.log"),
                },
                work / f"worker{i}.out",
            )
            for i in range(2)
        ]
        sender = Proc(
            "sender",
            [sys.executable, "-m", "nudgeflow.cli", "send", "--channel", "push", "--provider", "webhook"],
            {
                **base_env,
                "NUDGEFLOW_DATA_DIR": str(work / "data-sender"),
                "NUDGEFLOW_WEBHOOK_URL": endpoint.url,
                "NUDGEFLOW_OUTBOUND_ALLOW_NETWORKS": "127.0.0.1/32",  # the local endpoint
            },
            work / "sender.out",
        )
        procs = [*workers, sender]
        for p in procs:
            p.start()
        time.sleep(15)  # group formed (Tansu answers the first JoinGroup after half the session timeout)
        traffic = Traffic(broker.bootstrap, topics, work / "events.jsonl", a.rate, a.seconds, a.users)
        producing = threading.Thread(target=traffic.run)
        producing.start()
        t0 = time.monotonic()
        print(f"traffic starts at epoch {time.time():.3f}", flush=True)
        gap = a.seconds / (a.kills + 2)
        freeze_at = rng.randrange(a.kills // 3, 2 * a.kills // 3)
        froze = 0.0
        for k in range(a.kills):
            time.sleep(gap * rng.uniform(0.6, 1.2))
            if k == freeze_at and a.freeze > 0:
                assert broker.proc is not None
                print(
                    f"{time.monotonic() - t0:6.1f}s freeze the broker for {a.freeze:.0f} s (epoch {time.time():.3f})",
                    flush=True,
                )
                broker.proc.send_signal(signal.SIGSTOP)
                time.sleep(a.freeze)
                broker.proc.send_signal(signal.SIGCONT)
                froze = a.freeze
            victim = rng.choice(procs)
            print(f"{time.monotonic() - t0:6.1f}s SIGKILL {victim.name}", flush=True)
            victim.kill()
            time.sleep(rng.uniform(0.5, 3))
            victim.start()
            if victim in workers and rng.random() < 0.3:  # the other worker, while the group rebalances
                other = workers[1 - workers.index(victim)]
                time.sleep(rng.uniform(1, 4))
                print(f"{time.monotonic() - t0:6.1f}s SIGKILL {other.name} (mid-rebalance)", flush=True)
                other.kill()
                time.sleep(rng.uniform(0.5, 2))
                other.start()
        producing.join()
        print(f"{time.monotonic() - t0:6.1f}s traffic done: {traffic.produced} events", flush=True)
        assert not traffic.failed, traffic.failed[:3]

        expected_out = subprocess.run(
            [*SIMULATE, "--events", str(work / "events.jsonl"), "--journeys", str(work / "journeys")],
            capture_output=True,
            check=True,
        ).stdout
        expected_docs = {(d := orjson.loads(x))["key"]: d for x in expected_out.splitlines() if b'"type":"send"' in x}
        expected = set(expected_docs)

        sent_docs: dict[str, tuple[int, bytes]] = {}  # key -> (Kafka timestamp, document) of the last read

        def sent_keys() -> Counter[str]:
            keys: Counter[str] = Counter()
            for m in read_topic(broker.bootstrap, topics.channel("push")):
                key = orjson.loads(m.value())["key"]
                keys[key] += 1
                sent_docs[key] = (m.timestamp()[1], m.value())
            return keys

        deadline, stable, last = time.monotonic() + 600, 0, (-1, -1)
        while time.monotonic() < deadline and stable < 4:  # every timer fired and every send delivered
            time.sleep(5)
            now = (len(sent_keys()), len(endpoint.received))
            stable = stable + 1 if now == last and now[1] >= len(expected) else 0
            last = now
        topic = sent_keys()
        for p in procs:
            p.stop()

    got, received = set(topic), set(endpoint.received)
    result = {
        "seconds": a.seconds,
        "events": traffic.produced,
        "kills": {p.name: p.kills for p in procs},
        "broker_frozen_s": froze,
        "expected_sends": len(expected),
        "topic_keys": len(got),
        "topic_lost": len(expected - got),
        "topic_extra": len(got - expected),
        "topic_records_twice": sum(n - 1 for n in topic.values()),
        "delivered": len(received),
        "delivered_lost": len(expected - received),
        "delivered_extra": len(received - expected),
        "redelivered_deduplicated": sum(n - 1 for n in endpoint.received.values()),
    }
    lost_file = work / "lost.jsonl"
    with lost_file.open("wb") as f:
        for k in sorted(expected - got):
            f.write(orjson.dumps(expected_docs[k]) + b"\n")
    if expected - got:
        print(f"lost send requests (as simulate made them): {lost_file}")
    extra_file = work / "extra.jsonl"
    with extra_file.open("wb") as f:
        for k in sorted(got - expected):
            at, doc = sent_docs[k]
            f.write(orjson.dumps({"produced_ms": at, "request": orjson.loads(doc)}) + b"\n")
    if got - expected:
        print(f"extra send requests (with the Kafka timestamp they were produced at): {extra_file}")
    ok = not (result["topic_lost"] or result["topic_extra"] or result["delivered_lost"] or result["delivered_extra"])
    print(
        f"\n{traffic.produced} events in {a.seconds:.0f} s; kills {result['kills']}; broker frozen {froze:.0f} s\n"
        f"expected sends (simulate): {len(expected)}\n"
        f"push topic: {len(got)} keys, lost {result['topic_lost']}, extra {result['topic_extra']}, "
        f"records written twice {result['topic_records_twice']}\n"
        f"endpoint: {len(received)} delivered, lost {result['delivered_lost']}, extra {result['delivered_extra']}, "
        f"repeated deliveries deduplicated by idempotency key {result['redelivered_deduplicated']}\n"
        + ("OK: nothing lost, nothing extra" if ok else "FAILED")
    )
    print("RESULT " + json.dumps(result), flush=True)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
