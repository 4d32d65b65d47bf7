"""`nudgeflow demo`: one command that shows the product working on this machine.

Starts the embedded broker, a worker (`nudgeflow run`) and a console push sender as child
processes, produces synthetic shopping traffic for a few thousand users (with a malformed message
now and then, to show the dead-letter path), and prints a status line from the worker's metrics
every few seconds. Ctrl-C stops everything; children also die with this process.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import orjson
from confluent_kafka import Producer
from prometheus_client.parser import text_string_to_metric_families

from nudgeflow.broker import EmbeddedBroker, die_with_parent, ensure_topics, free_port, stop_process
from nudgeflow.streams.topics import Topics
from nudgeflow.worker import all_topics

PRODUCTS = [
    "Red hoodie",
    "Trail sneakers",
    "Noise-cancelling earphones",
    "Linen shirt",
    "Smart watch",
    "Espresso maker",
    "Yoga mat",
    "Leather wallet",
    "Sunglasses",
    "Backpack",
]


class Traffic(threading.Thread):
    """Shoppers: views, add-to-cart, and for about half of the carts a purchase within seconds."""

    def __init__(self, bootstrap: str, topics: Topics, users: int, rate: float, seed: int = 7) -> None:
        super().__init__(daemon=True, name="demo-traffic")
        self.topics, self.users, self.rate, self.rng = topics, users, rate, random.Random(seed)  # nosec B311
        self.producer = Producer(
            {"bootstrap.servers": bootstrap, "linger.ms": 20, "log_level": 3, "partitioner": "murmur2_random"}
        )
        self.stop_flag = threading.Event()
        self.sent = 0

    def emit(self, topic: str, user: str, body: dict[str, object] | bytes) -> None:
        value = body if isinstance(body, bytes) else orjson.dumps(body)
        self.producer.produce(self.topics.name(topic), key=user.encode(), value=value)
        self.sent += 1

    def run(self) -> None:
        pending: list[tuple[float, str, dict[str, object]]] = []  # purchases scheduled for later
        interval = 1.0 / self.rate
        n = 0
        while not self.stop_flag.is_set():
            now = time.time()
            due = [p for p in pending if p[0] <= now]
            pending = [p for p in pending if p[0] > now]
            for _, user, ev in due:
                self.emit("charged", user, ev)
            user = f"user-{self.rng.randrange(self.users):05d}"
            product = self.rng.choice(PRODUCTS)
            ts = int(now * 1000)
            r = self.rng.random()
            if r < 0.55:
                self.emit("page_viewed", user, {"user_id": user, "ts": ts, "props": {"url": f"/p/{product}"}})
            else:
                self.emit(
                    "add_to_cart",
                    user,
                    {
                        "user_id": user,
                        "ts": ts,
                        "event_id": f"atc-{n}",
                        "props": {"product": product, "price": self.rng.randint(10, 300)},
                    },
                )
                if self.rng.random() < 0.5:  # buys within 2-10 s: converts, no push
                    later = now + self.rng.uniform(2, 10)
                    pending.append(
                        (later, user, {"user_id": user, "ts": int(later * 1000), "props": {"product": product}})
                    )
            if n % 400 == 399:  # a malformed message, to show the dead-letter topic at work
                self.emit("add_to_cart", "bad", b'{"ts": "not a time", "props": ')
            n += 1
            self.producer.poll(0)
            self.stop_flag.wait(interval)
        self.producer.flush(10)


def scrape(url: str) -> dict[str, float]:
    """Sum of each metric's samples (over labels), from the worker's /metrics."""
    try:
        text = httpx.get(url, timeout=2).text
    except httpx.HTTPError:
        return {}
    out: dict[str, float] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.labels.get("topic", "").startswith("nudgeflow."):
                continue  # internal topics (ticks, feedback) are not input events
            out[s.name] = out.get(s.name, 0.0) + s.value
    return out


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def run_demo(users: int, rate: float, duration: float, journeys: list[Path], metrics_port: int) -> None:
    for sig in (signal.SIGINT, signal.SIGTERM):  # both stop the demo in order (also when started in the background)
        signal.signal(sig, _interrupt)
    work = Path(tempfile.mkdtemp(prefix="nudgeflow-demo-"))
    topics = Topics()
    procs: list[subprocess.Popen[bytes]] = []
    traffic: Traffic | None = None
    broker = EmbeddedBroker(log_path=work / "broker.log").start()
    if metrics_port == 0:
        metrics_port = free_port()
    try:
        ensure_topics(broker.bootstrap, all_topics(topics), 4, 86_400_000, copartitioned=topics.inputs)
        env = {
            **os.environ,
            "NUDGEFLOW_BROKER": f"kafka://{broker.bootstrap}",
            "NUDGEFLOW_DATA_DIR": str(work / "data"),
            "NUDGEFLOW_SESSION_TIMEOUT_S": "6",
            "NUDGEFLOW_REBALANCE_TIMEOUT_S": "6",
            "NUDGEFLOW_HEARTBEAT_S": "1",
        }
        cli = [sys.executable, "-m", "nudgeflow.cli"]
        worker_cmd = [*cli, "run", "--metrics-port", str(metrics_port), "--log-file", str(work / "worker.log")]
        for j in journeys:
            worker_cmd += ["--journeys", str(j)]
        # own process groups: a Ctrl-C reaches the demo alone, which stops its parts in order
        procs.append(subprocess.Popen(worker_cmd, env=env, preexec_fn=die_with_parent, process_group=0))
        sender_cmd = [*cli, "send", "--channel", "push"]
        procs.append(subprocess.Popen(sender_cmd, env=env, preexec_fn=die_with_parent, process_group=0))
        url = f"http://127.0.0.1:{metrics_port}/metrics"
        print(f"demo: broker {broker.bootstrap} (pid {broker.proc.pid if broker.proc else '?'}), logs in {work}")
        print(f"demo: metrics at {url}  (Ctrl-C stops everything)", flush=True)
        traffic = Traffic(broker.bootstrap, topics, users, rate)
        traffic.start()
        started = time.time()
        while duration <= 0 or time.time() - started < duration:
            time.sleep(5)
            for p in procs:
                if p.poll() is not None:
                    raise SystemExit(f"demo: a child process exited with code {p.returncode}; see {work}")
            m = scrape(url)
            print(
                f"demo status: produced={traffic.sent} consumed={m.get('nudgeflow_events_consumed_total', 0):.0f} "
                f"entered={m.get('nudgeflow_journey_entries_total', 0):.0f} "
                f"converted={m.get('nudgeflow_journey_conversions_total', 0):.0f} "
                f"sends={m.get('nudgeflow_send_requests_total', 0):.0f} "
                f"pending_timers={m.get('nudgeflow_pending_timers', 0):.0f} "
                f"dead_letters={m.get('nudgeflow_invalid_events_total', 0):.0f}",
                flush=True,
            )
    except KeyboardInterrupt:
        print("\ndemo: stopping", flush=True)
    finally:
        if traffic:
            traffic.stop_flag.set()
            traffic.join(15)
            del traffic.producer  # its client threads would keep reconnecting to the stopped broker
        for p in reversed(procs):  # the sender, then the worker, then the broker: nobody loses its peer
            stop_process(p, 15)
        broker.stop()
        shutil.rmtree(work / "data", ignore_errors=True)
        print("demo: stopped", flush=True)
