"""`nudgeflow run`: load and validate journeys, make sure topics exist, serve metrics, run Faust."""

from __future__ import annotations

import gc
import logging
import os
import signal
import sys
import threading
from typing import Any

import faust

from nudgeflow import compiled
from nudgeflow.agents import datadir, health, metrics
from nudgeflow.agents.app import build_app, owners_topic
from nudgeflow.agents.owners import OWNERS_CONFIG
from nudgeflow.agents.registry import REGISTRY_CONFIG, check_and_record
from nudgeflow.broker import TANSU_CLUSTER_ID, EmbeddedBroker, cluster_identity, ensure_topics
from nudgeflow.engine.errors import ConfigError
from nudgeflow.engine.loader import load_journeys
from nudgeflow.settings import Settings
from nudgeflow.streams.topics import Topics

log = logging.getLogger("nudgeflow")


def all_topics(topics: Topics) -> list[str]:
    return [
        *topics.inputs,
        topics.dead_letter,
        topics.calls,
        topics.profile_changes,
        *topics.channels,
        topics.send_dead_letter,
        *topics.key_topics,
    ]


KEYS_CONFIG = {"cleanup.policy": "compact,delete"}  # latest state per key, gone after the retention


def start_metrics(host: str, port: int) -> int:
    """/metrics, /healthz and /readyz (agents/health.py) on one port; the port bound."""
    try:
        return health.serve(host, port)
    except OSError as e:
        raise ConfigError(
            f"cannot serve metrics on {host}:{port} ({e.strerror}): set NUDGEFLOW_METRICS_PORT (0 picks a free port)"
        ) from None


STOP_DEADLINE_S = 9.0  # after SIGTERM/SIGINT: README promises an exit within 10 s


class Worker(faust.Worker):
    """Faust's worker, with a deadline on stopping: whatever hangs (a broker that is gone, a group
    that cannot be left), the process exits within 10 s of the signal. What was made durable is in
    the store; what was not is read again from the stored positions."""

    def _schedule_shutdown(self, sig: signal.Signals) -> None:
        if not self._signal_stop_time:
            deadline = threading.Timer(STOP_DEADLINE_S, _exit_now)
            deadline.daemon = True
            deadline.start()
        super()._schedule_shutdown(sig)


def _exit_now() -> None:
    log.warning("stop did not finish within %.0f s: exiting now", STOP_DEADLINE_S)
    logging.shutdown()
    sys.stdout.flush()
    os._exit(0)


def tune_gc() -> None:
    """The hot path makes many short-lived containers per event, which reference counting frees;
    the cyclic collector's default (a young-generation pass every 700 net allocations) walked the
    live ones of the batch in hand over and over: ~2 s of every 7 in bench/core_only.py. What is
    loaded by now is frozen out of its sight, and a young pass waits for a million net
    allocations (a few batches): 0.25 s of GC instead, ~25% more events/s."""
    gc.freeze()
    gc.set_threshold(1_000_000, 20, 100)


def run_worker(settings: Settings) -> None:
    journeys = load_journeys(settings.journeys)  # a bad file stops here, before any I/O
    broker = None
    if settings.broker == "embedded":
        broker = EmbeddedBroker().start()
        settings = settings.model_copy(update={"broker": f"kafka://{broker.bootstrap}"})
    try:
        topics = settings.topics()
        kafka = settings.kafka_conf()
        if settings.create_topics:
            ensure_topics(
                kafka,
                topics.key_topics,
                settings.partitions,
                settings.retention_ms,
                config=KEYS_CONFIG,
                replication=settings.replication_factor,
            )
            ensure_topics(
                kafka,
                all_topics(topics),
                settings.partitions,
                settings.retention_ms,
                copartitioned=topics.inputs,
                replication=settings.replication_factor,
            )
            ensure_topics(
                kafka, [topics.journey_registry], 1, -1, config=REGISTRY_CONFIG, replication=settings.replication_factor
            )
            ensure_topics(
                kafka,
                [owners_topic(settings.app_id)],
                1,
                -1,
                config=OWNERS_CONFIG,
                replication=settings.replication_factor,
            )
        accepted, incarnation = check_and_record(
            kafka, topics.journey_registry, journeys, settings.accept_edited_journeys
        )
        cluster_id = cluster_identity(kafka)
        try:
            datadir.claim(settings.data_dir, cluster_id, incarnation, ephemeral_broker=cluster_id == TANSU_CLUSTER_ID)
        except OSError as err:
            where = settings.data_dir
            raise ConfigError(f"cannot use the data dir {where} ({err.strerror}): set NUDGEFLOW_DATA_DIR") from None
        for e in accepted:
            log.warning("journey %s version %s runs edited content %s (was %s)", e.journey, e.version, e.now, e.was)
        for j in journeys.journeys.values():
            metrics.JOURNEY_INFO.labels(j.id, str(j.version), j.digest).set(1)
        port = start_metrics(settings.metrics_host, settings.metrics_port)
        print(
            f"nudgeflow worker {settings.app_id}: {len(journeys.journeys)} journey(s) "
            f"[{', '.join(sorted(journeys.journeys))}] on {settings.bootstrap}; "
            f"metrics at http://{settings.metrics_host}:{port}/metrics; "
            f"hot modules compiled: {compiled.summary()}",
            flush=True,
        )
        app, _runtime = build_app(settings, journeys)
        tune_gc()
        # INFO, not WARN: at WARN Faust's progress spinner turns the root logger to DEBUG.
        level = settings.log_level if settings.log_level.lower() in ("debug", "info") else "info"
        worker_kwargs: dict[str, Any] = {"loglevel": level, "quiet": True, "redirect_stdouts": False}
        if settings.log_file:
            worker_kwargs["logfile"] = str(settings.log_file)
        worker = Worker(app, **worker_kwargs)
        for noisy in ("aiokafka", "faust", "mode"):
            logging.getLogger(noisy).setLevel(
                logging.WARNING if settings.log_level.lower() != "debug" else logging.DEBUG
            )
        worker.execute_from_commandline()
    finally:
        if broker:
            broker.stop()
        sys.stdout.flush()
