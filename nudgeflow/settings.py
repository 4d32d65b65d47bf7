"""All configuration in one object: environment variables NUDGEFLOW_* or CLI flags (flags win).

See README "Configuration" for the table of settings.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from nudgeflow.streams.topics import Topics


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="NUDGEFLOW_", extra="forbid", frozen=True)

    broker: str | None = Field(
        None,
        description="kafka://host:9092[,host2:9092], or 'embedded' (an in-memory Tansu: demos and tests); "
        "`nudgeflow run` refuses to start without one",
    )
    app_id: str = Field("nudgeflow", description="consumer group and state table prefix")
    topic_prefix: str = Field("", description="prefix for every topic name")
    input_topics: Annotated[dict[str, str], NoDecode] = Field(
        {},
        description="a site's own topics read in place of nudgeflow's input topics, by role: "
        "`add_to_cart=shop.cart-events,charged=shop.orders` (or a JSON object); roles: page_viewed, add_to_cart, "
        "charged (the role names the event), custom_events (the event name is the message's `event`), user_profiles",
    )
    partitions: int = Field(4, ge=1, description="partitions of topics nudgeflow creates")
    create_topics: bool = Field(True, description="create missing topics at start")
    replication_factor: int = Field(
        1,
        ge=1,
        description="replication of the topics nudgeflow creates, the state changelog included (3 in production)",
    )
    kafka_security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = Field(
        "PLAINTEXT", description="security.protocol of every Kafka client (worker, senders, call runner, tools)"
    )
    kafka_sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] = Field(
        "PLAIN", description="sasl.mechanism with SASL_PLAINTEXT / SASL_SSL"
    )
    kafka_sasl_username: str | None = None
    kafka_sasl_password: SecretStr | None = None
    kafka_ssl_cafile: Path | None = Field(None, description="CA bundle to verify the brokers (default: the system's)")
    kafka_ssl_certfile: Path | None = Field(None, description="client certificate (mutual TLS)")
    kafka_ssl_keyfile: Path | None = Field(None, description="client key (mutual TLS)")
    retention_ms: int = Field(7 * 86_400_000, description="retention.ms of created topics")
    journeys: list[Path] = Field([Path("journeys")], description="journey files or directories")
    data_dir: Path = Field(Path("nudgeflow-data"), description="RocksDB state directory")
    metrics_host: str = "127.0.0.1"
    metrics_port: int = Field(9464, description="Prometheus /metrics port; 0 picks a free one")
    channel_metrics_port: int | None = Field(
        None, description="Prometheus /metrics port of a sender or the call runner (unset: none)"
    )
    max_event_bytes: int = Field(65536, description="larger messages go to the dead-letter topic")
    max_future_ms: int = Field(86_400_000, description="event times further ahead are rejected")
    keyless: Literal["accept", "dead_letter"] = Field(
        "dead_letter",
        description="input messages without a key: a keyless message lands on any partition, away from the "
        "user's state, so by default it is dead-lettered (missing_key); keys must be the user_id (else key_mismatch)",
    )
    dead_letter_max_bytes: int = Field(
        512 * 1024, description="a rejected message larger than this goes to the dead-letter topic as a stub"
    )
    max_fetch_bytes: int = Field(
        16 * 2**20,
        description="consumer fetch size per partition: at least the brokers' message.max.bytes, so that no "
        "message the broker accepts is skipped unseen",
    )
    batch_max: int = Field(20_000, ge=1, description="input messages per processing batch, at most")
    batch_within_ms: int = Field(50, ge=1, description="how long an idle worker waits for input before it looks again")
    checkpoint_ms: int = Field(
        5000,
        ge=0,
        description="state is made durable (RocksDB, changelog, input positions) a checkpoint at a time: at most "
        "this long after the checkpoint's first batch, or as soon as the input runs dry; a user active in several "
        "batches of a checkpoint is written once. A crash reads this much input again (send requests of it are "
        "produced again with the same idempotency keys)",
    )
    cache_users: int = Field(
        100_000,
        ge=0,
        description="user records kept in memory (as stored bytes) between batches (least recently used go)",
    )
    input_idle_ms: int = Field(
        500,
        ge=0,
        description="an input partition read to its end with nothing new for this long no longer holds back "
        "other topics' inputs or timers (README 'How it stays correct')",
    )
    timer_interval_ms: int = Field(50, ge=10, description="how often due timers are scanned")
    timer_grace_ms: int = Field(0, ge=0, description="fire timers this long after due (late events)")
    timer_fire_limit: int = Field(2000, ge=1, description="max ticks per partition per scan")
    member_scan_rate: int = Field(
        2000, ge=1, description="users per second checked by a current-members scan (include_current_members)"
    )
    session_timeout_s: float = Field(10.0, description="consumer group session timeout")
    heartbeat_s: float = Field(2.0)
    rebalance_timeout_s: float = Field(10.0)
    rocksdb_memory_mb: int = Field(
        256,
        ge=16,
        description="RocksDB memory of a worker, all of its state partitions together: one block cache, which "
        "their memtables are charged to (at most half of it; each partition's memtable flushes at 16 MB)",
    )
    accept_edited_journeys: bool = Field(
        False,
        description="start even though a journey's content changed without a version bump (see README "
        "'Editing journeys'); without it the worker refuses to start and names the journey",
    )
    release_quarantined: bool = Field(
        False, description="release every quarantined user the next time an input or timer of theirs arrives"
    )
    pure: bool = Field(
        False,
        description="run every module from its Python source even where it is compiled (README 'Compiled "
        "modules'); read from the environment when nudgeflow is imported, before any other setting",
    )
    state_max_bytes: int = Field(
        256 * 1024,
        ge=4096,
        description="a user's journey state, serialised, at most: an input that would make it larger goes to "
        "the dead-letter topic (state_too_large)",
    )
    topic_secret: SecretStr | None = Field(
        None,
        description="HMAC key for nudgeflow's internal topics (send requests, calls, call results, feedback): set it "
        "on every worker, sender and call runner; unsigned or forged messages are then dead-lettered",
    )
    outbound_allow_hosts: Annotated[list[str], NoDecode] = Field(
        [],
        description="hosts the call runner may call (`api.example.com`, `*.example.com`, optionally `:port`); "
        "empty: any public host",
    )
    outbound_allow_networks: Annotated[list[str], NoDecode] = Field(
        [],
        description="address ranges (CIDR) the call runner may reach although they are loopback, private, "
        "link-local or otherwise not public (e.g. 10.1.2.0/24 for an internal API)",
    )
    call_max_response_bytes: int = Field(
        32 * 1024, ge=1024, description="a call's answer larger than this is cut off and the call fails (too_large)"
    )
    send_rate_per_s: float | None = Field(
        None, gt=0, description="a sender's provider calls per second, at most (the provider's rate limit)"
    )
    send_keys_ttl_s: float = Field(
        7 * 86400, gt=0, description="how long a sender remembers delivered idempotency keys (longer than any expiry)"
    )
    log_level: str = Field("info")
    log_file: Path | None = None

    @field_validator("input_topics", mode="before")
    @classmethod
    def _input_topics(cls, v: object) -> object:
        if isinstance(v, str):
            v = v.strip()
            if v.startswith("{"):
                import json

                return json.loads(v)
            pairs = [x.split("=", 1) for x in v.split(",") if x.strip()]
            if any(len(p) != 2 for p in pairs):
                raise ValueError("role=topic pairs, comma-separated")
            v = {k.strip(): t.strip() for k, t in pairs}
        if isinstance(v, dict):
            from nudgeflow.streams.topics import INPUT_ROLES

            unknown = sorted(set(v) - set(INPUT_ROLES))
            if unknown:
                raise ValueError(f"unknown input roles {unknown}; roles: {', '.join(INPUT_ROLES)}")
        return v

    def topics(self) -> Topics:
        """The topic names of these settings (prefix, and a site's own input topics)."""
        return Topics(self.topic_prefix, tuple(sorted(self.input_topics.items())))

    @field_validator("outbound_allow_hosts", "outbound_allow_networks", mode="before")
    @classmethod
    def _comma_list(cls, v: object) -> object:
        return [x.strip() for x in v.split(",") if x.strip()] if isinstance(v, str) else v

    @field_validator("broker")
    @classmethod
    def _broker(cls, v: str | None) -> str | None:
        if v is not None and v != "embedded" and not v.startswith("kafka://"):
            raise ValueError("broker must be 'embedded' or kafka://host:port[,host:port]")
        return v

    def kafka_conf(self) -> dict[str, Any]:
        """confluent-kafka settings every client of these settings starts from: brokers and security."""
        conf: dict[str, Any] = {"bootstrap.servers": self.bootstrap, "security.protocol": self.kafka_security_protocol}
        if self.kafka_security_protocol.startswith("SASL"):
            conf["sasl.mechanism"] = self.kafka_sasl_mechanism
            conf["sasl.username"] = self.kafka_sasl_username or ""
            conf["sasl.password"] = self.kafka_sasl_password.get_secret_value() if self.kafka_sasl_password else ""
        if self.kafka_security_protocol.endswith("SSL"):
            for key, path in (
                ("ssl.ca.location", self.kafka_ssl_cafile),
                ("ssl.certificate.location", self.kafka_ssl_certfile),
                ("ssl.key.location", self.kafka_ssl_keyfile),
            ):
                if path is not None:
                    conf[key] = str(path)
        return conf

    @property
    def bootstrap(self) -> str:
        """host:port list for confluent-kafka."""
        if self.broker is None or self.broker == "embedded":
            raise ValueError("no broker address: set NUDGEFLOW_BROKER=kafka://host:port")
        return ",".join(h.removeprefix("kafka://") for h in self.broker.split(","))
