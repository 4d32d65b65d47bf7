"""Integration fixtures: one embedded broker per session, real worker processes per test module.

Workers run as `python -m nudgeflow.cli run` child processes (so a test can SIGKILL one), each
with its own topic prefix and consumer group, against the session's Tansu over TCP.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from confluent_kafka import Producer
from prometheus_client.parser import text_string_to_metric_families

from nudgeflow.broker import EmbeddedBroker, die_with_parent, ensure_topics, free_port, read_to_end, stop_process
from nudgeflow.streams.topics import Topics
from nudgeflow.worker import all_topics

HERE = Path(__file__).resolve().parent
PARTITIONS = 4


@pytest.fixture(scope="session")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedBroker]:
    b = EmbeddedBroker(log_path=tmp_path_factory.mktemp("broker") / "tansu.log").start()
    yield b
    b.stop()


class PortTaken(Exception):
    """The worker's metrics port was bound by someone else between choosing and using it."""


@dataclass
class Worker:
    """A `nudgeflow run` child process and what it needs to be observed."""

    broker: EmbeddedBroker
    topics: Topics
    app_id: str
    data_dir: Path
    journeys: Path
    log: Path
    metrics_port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None
    module: str = "nudgeflow.cli"  # tests.integration.faulty_worker injects an engine fault
    extra_env: dict[str, str] = field(default_factory=dict)

    def env(self) -> dict[str, str]:
        return {
            **os.environ,
            "NUDGEFLOW_BROKER": f"kafka://{self.broker.bootstrap}",
            "NUDGEFLOW_APP_ID": self.app_id,
            "NUDGEFLOW_TOPIC_PREFIX": self.topics.prefix,
            "NUDGEFLOW_DATA_DIR": str(self.data_dir),
            "NUDGEFLOW_JOURNEYS": orjson.dumps([str(self.journeys)]).decode(),
            "NUDGEFLOW_METRICS_PORT": str(self.metrics_port),
            "NUDGEFLOW_PARTITIONS": str(PARTITIONS),
            "NUDGEFLOW_SESSION_TIMEOUT_S": "6",
            "NUDGEFLOW_REBALANCE_TIMEOUT_S": "6",
            "NUDGEFLOW_HEARTBEAT_S": "1",
            "NUDGEFLOW_TIMER_INTERVAL_MS": "100",
            "NUDGEFLOW_LOG_FILE": str(self.log),
            **self.extra_env,
        }

    def start(self, timeout: float = 60) -> Worker:
        for _ in range(5):
            try:
                return self._start(timeout)
            except PortTaken:  # free_port() is a guess: another process may bind it first
                self.metrics_port = free_port()
        raise RuntimeError("no free metrics port after 5 tries")

    def _start(self, timeout: float) -> Worker:
        err_path = self.log.with_suffix(".err")
        err_before = err_path.stat().st_size if err_path.exists() else 0
        self.proc = subprocess.Popen(
            [sys.executable, "-m", self.module, "run"],
            env=self.env(),
            stdout=subprocess.DEVNULL,
            stderr=open(self.log.with_suffix(".err"), "ab"),  # noqa: SIM115 - the child process keeps it
            preexec_fn=die_with_parent,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:  # ready = partitions assigned and timers indexed
            if self.proc.poll() is not None:
                err = err_path.read_bytes()[err_before:].decode(errors="replace")
                if self.proc.returncode == 2 and "cannot serve metrics" in err:
                    raise PortTaken(err)
                raise RuntimeError(f"worker exited {self.proc.returncode}: {err}")
            if any(n == "nudgeflow_pending_timers" for n, _, _ in self.samples()):
                return self
            time.sleep(0.3)
        raise TimeoutError(f"worker not ready in {timeout}s; log: {self.log}")

    def kill(self) -> None:
        assert self.proc
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            stop_process(self.proc, 20)

    def samples(self) -> list[tuple[str, dict[str, str], float]]:
        """Every sample on the worker's /metrics."""
        try:
            text = httpx.get(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=2).text
        except httpx.HTTPError:
            return []
        return [(s.name, s.labels, s.value) for fam in text_string_to_metric_families(text) for s in fam.samples]

    def metric(self, name: str, **labels: str) -> float:
        """Sum of the samples of `name` whose labels include `labels`."""
        return sum(v for n, lab, v in self.samples() if n == name and labels.items() <= lab.items())


def journeys_dir(tmp: Path, **files: str) -> Path:
    """A journeys directory holding `name.yaml` for each keyword."""
    d = tmp / "journeys"
    d.mkdir()
    for name, text in files.items():
        (d / f"{name}.yaml").write_text(text)
    return d


def new_worker(broker: EmbeddedBroker, tmp: Path, journeys: Path) -> Worker:
    tag = uuid.uuid4().hex[:8]
    topics = Topics(f"t{tag}.")
    ensure_topics(broker.bootstrap, all_topics(topics), PARTITIONS, 86_400_000, copartitioned=topics.inputs)
    return Worker(broker, topics, f"nf-{tag}", tmp / f"data-{tag}", journeys, tmp / f"worker-{tag}.log")


class Client:
    """Produce events like a site would (murmur2, keyed by user) and read topics back."""

    def __init__(self, broker: EmbeddedBroker, topics: Topics) -> None:
        self.bootstrap, self.topics = broker.bootstrap, topics
        self.producer = Producer(
            {"bootstrap.servers": self.bootstrap, "partitioner": "murmur2_random", "linger.ms": 5, "log_level": 3}
        )

    def produce(self, topic: str, user: str, value: object) -> None:
        raw = value if isinstance(value, bytes) else orjson.dumps(value)
        self.producer.produce(self.topics.name(topic), key=user.encode(), value=raw)
        self.producer.flush(10)

    def read(self, topic: str, min_count: int = 0, timeout: float = 30.0) -> list[Any]:
        """Every message of a topic (full name) up to its end, once at least `min_count` are there.

        The end is each partition's EOF event (fetch high watermarks are right on Tansu, while
        ListOffsets(latest) is not)."""
        deadline = time.monotonic() + timeout
        while True:
            got = self._read_to_end(topic, max(1.0, deadline - time.monotonic()))
            if len(got) >= min_count or time.monotonic() >= deadline:
                return got
            time.sleep(0.3)

    def _read_to_end(self, topic: str, timeout: float) -> list[Any]:
        return read_to_end(self.bootstrap, topic, PARTITIONS, timeout)


def wait_for(predicate, timeout: float = 30.0, every: float = 0.2) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(every)
    return False


def simulated_sends(events_file: Path, journeys: Path) -> list[dict[str, Any]]:
    """The send requests `nudgeflow simulate` computes for an events file: the worker's reference."""
    out = subprocess.run(
        [sys.executable, "-m", "nudgeflow.cli", "simulate", "--events", str(events_file), "--journeys", str(journeys)],
        capture_output=True,
        check=True,
    )
    return [orjson.loads(x) for x in out.stdout.splitlines() if b'"type":"send"' in x]


def send_view(s: dict[str, Any]) -> tuple[Any, ...]:
    """What must be identical between the worker's and the simulator's send requests."""
    return s["key"], s["user_id"], s["created_at"], s["content"]["title"], s["instance"]
