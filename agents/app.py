"""The Faust app: group membership, partition assignment and the state table's RocksDB stores.

What Faust does here: it joins the consumer group, assigns partitions (by the internal
`nudgeflow.ticks` topic, which is co-partitioned with every input, so partition p of each input
and of the state table go to the same worker), opens and closes the state table's RocksDB store
per assigned partition, and serves as the process frame (signals, logging, services).

What it does not do: deliver input messages one at a time, or restore the table record by record
(agents.framework turns its recovery off). The `agents.pipeline.Pipeline` service reads the inputs
with its own consumer, applies them in batches and restores partitions in bulk; Faust tells it
when partitions are revoked (the pipeline stands still and forgets what is in memory) and when
assigned partitions are "recovered" (the pipeline restores them and starts).
"""

from __future__ import annotations

import logging
from typing import Any, cast

import faust

from nudgeflow.agents import health, metrics
from nudgeflow.agents.align import Aligner
from nudgeflow.agents.batch import BatchCore
from nudgeflow.agents.framework import TableManager
from nudgeflow.agents.inputs import InputReader
from nudgeflow.agents.members import MemberScanner
from nudgeflow.agents.output import Output
from nudgeflow.agents.pipeline import Pipeline, PipelineConfig
from nudgeflow.agents.restore import RestoreError
from nudgeflow.agents.store import MEMORY_OPTION, StateStore
from nudgeflow.agents.timers import TimerScanner
from nudgeflow.engine.graph import JourneySet
from nudgeflow.settings import Settings
from nudgeflow.streams.events import Decoder
from nudgeflow.streams.wire import Signer

log = logging.getLogger("nudgeflow.worker")
TABLE = "journey-state"


def client_conf(settings: Settings) -> dict[str, Any]:
    """Connection settings shared by every confluent-kafka client of the worker."""
    return settings.kafka_conf()


def owners_topic(app_id: str) -> str:
    """The compacted topic of partition owners (agents/owners.py), beside the changelog."""
    return f"{app_id}-owners"


def faust_credentials(s: Settings) -> Any:
    """The same security for Faust's own (aiokafka) clients: None, SSL or SASL credentials."""
    proto = s.kafka_security_protocol
    if proto == "PLAINTEXT":
        return None
    ssl_context = None
    if proto.endswith("SSL"):
        import ssl

        ssl_context = ssl.create_default_context(cafile=str(s.kafka_ssl_cafile) if s.kafka_ssl_cafile else None)
        if s.kafka_ssl_certfile:
            ssl_context.load_cert_chain(
                str(s.kafka_ssl_certfile), str(s.kafka_ssl_keyfile) if s.kafka_ssl_keyfile else None
            )
    if proto == "SSL":
        return faust.SSLCredentials(ssl_context)
    password = s.kafka_sasl_password.get_secret_value() if s.kafka_sasl_password else ""
    return faust.SASLCredentials(
        username=s.kafka_sasl_username, password=password, ssl_context=ssl_context, mechanism=s.kafka_sasl_mechanism
    )


def build_app(settings: Settings, journeys: JourneySet) -> tuple[faust.App, Pipeline]:
    """The worker's Faust app for these settings (the broker already resolved to kafka://...)."""
    s, partitions = settings, settings.partitions
    topics = s.topics()
    app = faust.App(
        s.app_id,
        broker=f"kafka://{s.bootstrap}",
        store="nudgeflow://",  # Faust's RocksDB store with one memory budget for all partitions (agents.store)
        datadir=str(s.data_dir),
        topic_partitions=partitions,
        consumer_auto_offset_reset="earliest",
        web_enabled=False,
        producer_linger_ms=5,
        broker_session_timeout=s.session_timeout_s,
        broker_heartbeat_interval=s.heartbeat_s,
        broker_rebalance_timeout=s.rebalance_timeout_s,
        topic_allow_declare=True,
        topic_replication_factor=s.replication_factor,
        broker_credentials=faust_credentials(s),
        table_standby_replicas=0,  # a standby would read the changelog through Faust's slow path
        recovery_consistency_check=False,  # the pipeline's bulk restore is the authority (agents.framework)
        TableManager=TableManager,
    )
    table = app.Table(
        TABLE,
        partitions=partitions,
        key_type=bytes,
        value_type=bytes,
        options={
            "driver": "rocksdict",
            MEMORY_OPTION: s.rocksdb_memory_mb * 2**20,
            "write_buffer_size": 16 * 2**20,
            "max_write_buffer_number": 2,
        },
        help="per-user journey state, input positions and the timer index",
    )
    conf = client_conf(s)
    changelog = table.changelog_topic.get_topic_name()
    store = StateStore(table)
    decoder = Decoder(s.max_event_bytes, s.max_future_ms, topics=topics)
    core = BatchCore(
        journeys,
        topics,
        decoder,
        release_quarantined=s.release_quarantined,
        keyless=s.keyless,
        dead_letter_max_bytes=s.dead_letter_max_bytes,
        cache_users=s.cache_users,
        signer=Signer(s.topic_secret.get_secret_value() if s.topic_secret else None),
        state_max_bytes=s.state_max_bytes,
    )
    # a partition may hold at least two batches before the topics ahead are paused (pausing drops
    # what librdkafka prefetched for them: thrashing, if it happened every batch)
    aligner = Aligner(topics.user_inputs, idle_ms=s.input_idle_ms, max_held=max(20_000, 2 * s.batch_max))
    pipeline = Pipeline(
        core,
        store,
        InputReader(conf, f"{s.app_id}-inputs", s.max_fetch_bytes, aligner),
        Output(conf, track_topic=changelog),
        TimerScanner(store, s.timer_grace_ms, s.timer_fire_limit),
        aligner,
        topics,
        changelog,
        PipelineConfig(
            batch_max=s.batch_max,
            batch_within_ms=s.batch_within_ms,
            timer_interval_ms=s.timer_interval_ms,
            checkpoint_ms=s.checkpoint_ms,
            revoke_timeout_s=max(1.0, s.rebalance_timeout_s * 0.6),
            client_conf=conf,
            app_id=s.app_id,
            owners_topic=owners_topic(s.app_id),
        ),
        members=MemberScanner(store, journeys, s.member_scan_rate),
        loop=app.loop,
    )
    app.add_dependency(pipeline)
    health.HEALTH.loop = pipeline

    # Faust assigns partitions by this topic; it carries no records (0.1 wrote timer ticks here)
    anchor = app.topic(topics.ticks, key_serializer="raw", value_serializer="raw", partitions=partitions)

    async def assignment_anchor(stream: Any) -> None:
        async for _ in stream:
            metrics.EVENTS.labels(topics.base(topics.ticks)).inc()

    async def on_recovered() -> None:
        actives = sorted(tp.partition for tp in app.assignor.assigned_actives() if tp.topic == changelog)
        try:
            await pipeline.assign(actives)
        except RestoreError as e:  # nothing sensible to run on: stop, saying why
            log.error("cannot restore the state: %s", e)
            await app.crash(e)

    async def on_revoked(sender: Any, *args: Any, **kwargs: Any) -> None:
        await pipeline.quiesce()

    app.agent(anchor, name="assignment")(assignment_anchor)
    table.on_recover(on_recovered)
    app.on_partitions_revoked.connect(cast(Any, on_revoked))  # mode's handler type is not satisfiable
    return app, pipeline
