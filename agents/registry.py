"""The journey registry: which content each (journey, version) had when a worker ran it.

Editing a journey file and forgetting to bump `version:` is an easy mistake, and a dangerous
one: users in flight would continue under a definition whose version says nothing changed. So
each worker, before it starts, reads the registry topic (one partition, compacted, never
expired), compares every loaded journey's content digest (`engine.compiler.content_digest`) with
the one recorded for its id and version, and refuses to start on a mismatch unless the operator
accepts the edit explicitly (`NUDGEFLOW_ACCEPT_EDITED_JOURNEYS`). Then it records its own.

Each record is the whole map (`{"journeys": {"<id>@<version>": digest}}`), produced as a batch
of its own, so the partition's end offset is exact on every broker (Tansu included).
"""

from __future__ import annotations

import contextlib
import time
import uuid
from dataclasses import dataclass

import orjson
from confluent_kafka import Consumer, KafkaException, Producer, TopicPartition

from nudgeflow.broker import Target, client_conf
from nudgeflow.engine.errors import NudgeflowError
from nudgeflow.engine.graph import JourneySet

REGISTRY_CONFIG = {"cleanup.policy": "compact", "retention.ms": "-1"}


class EditedJourneyError(NudgeflowError):
    """A journey's content changed while its version stayed the same."""


@dataclass(frozen=True, slots=True)
class Edit:
    journey: str
    version: int
    file: str
    was: str
    now: str


@dataclass
class Registry:
    journeys: dict[str, str]  # "<id>@<version>" -> content digest
    incarnation: str | None  # the first id ever recorded: names this cluster's nudgeflow data


def read_registry(bootstrap: Target, topic: str, timeout: float = 30.0) -> Registry:
    consumer = Consumer(
        client_conf(bootstrap, **{"group.id": "nudgeflow-registry", "enable.auto.commit": False, "log_level": 3})
    )
    seen: dict[str, str] = {}
    incarnation: str | None = None
    try:
        low, high = consumer.get_watermark_offsets(TopicPartition(topic, 0), timeout=timeout, cached=False)
        if high <= low:
            return Registry(seen, None)
        consumer.assign([TopicPartition(topic, 0, low)])
        position, deadline = low, time.monotonic() + timeout
        while position < high:
            if time.monotonic() > deadline:
                raise NudgeflowError(f"could not read the journey registry {topic} within {timeout:.0f}s")
            for m in consumer.consume(500, 1.0):
                if m.error():
                    continue
                with contextlib.suppress(orjson.JSONDecodeError, AttributeError, TypeError, ValueError):
                    doc = orjson.loads(m.value() or b"{}")  # not ours: ignored
                    seen.update(doc.get("journeys", {}))
                    incarnation = incarnation or doc.get("incarnation")
                position = m.offset() + 1
    except KafkaException as e:
        raise NudgeflowError(f"cannot read the journey registry {topic}: {e}") from e
    finally:
        consumer.close()
    return Registry(seen, incarnation)


def edits(journeys: JourneySet, recorded: dict[str, str]) -> list[Edit]:
    out = []
    for j in sorted(journeys.journeys.values(), key=lambda j: j.id):
        was = recorded.get(f"{j.id}@{j.version}")
        if was is not None and was != j.digest:
            out.append(Edit(j.id, j.version, j.file, was, j.digest))
    return out


def check_and_record(bootstrap: Target, topic: str, journeys: JourneySet, accept_edits: bool) -> tuple[list[Edit], str]:
    """Refuse edited journeys (unless accepted); record this set. Returns the accepted edits and
    the cluster's incarnation id (created by the first worker ever; the earliest record wins)."""
    registry = read_registry(bootstrap, topic)
    recorded = registry.journeys
    found = edits(journeys, recorded)
    if found and not accept_edits:
        lines = [
            f"journey '{e.journey}' ({e.file}) changed but its version is still {e.version} "
            f"(content {e.now}, was {e.was})"
            for e in found
        ]
        raise EditedJourneyError(
            "\n".join(lines) + "\nbump `version:` in the file to release the edit to users in flight, or set "
            "NUDGEFLOW_ACCEPT_EDITED_JOURNEYS=true to run it as it is (users on removed steps leave with "
            "reason step_removed; users in a wait keep the deadline they have)"
        )
    merged = {**recorded, **{f"{j.id}@{j.version}": j.digest for j in journeys.journeys.values()}}
    incarnation = registry.incarnation
    if merged != recorded or incarnation is None:
        producer = Producer(client_conf(bootstrap, **{"log_level": 3, "linger.ms": 0}))
        doc = {"journeys": merged, "incarnation": incarnation or uuid.uuid4().hex}
        producer.produce(topic, key=b"registry", value=orjson.dumps(doc))
        if producer.flush(30):
            raise NudgeflowError(f"cannot write the journey registry {topic}")
        if incarnation is None:  # two first workers at once: the earlier record wins
            incarnation = read_registry(bootstrap, topic).incarnation
    if incarnation is None:
        raise NudgeflowError(f"the journey registry {topic} has no incarnation id after writing one")
    return found, incarnation
