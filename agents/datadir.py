"""A data dir belongs to one cluster: the local state must never outlive the broker it came from.

Per-user state records the input offsets already applied; against another cluster (or an
in-memory broker that was restarted) those offsets mean nothing, and every event of a known
user would be dropped as a duplicate. So the data dir carries `cluster.json` with the cluster id
and the cluster's incarnation id (from the journey registry topic, `agents.registry`). On a
mismatch a worker on Apache Kafka refuses to start; on an in-memory broker (the embedded Tansu,
whose data dies with it) the stale state is removed and the worker starts fresh.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import orjson

from nudgeflow.engine.errors import NudgeflowError

MARKER = "cluster.json"
log = logging.getLogger("nudgeflow.worker")


class ForeignDataDir(NudgeflowError):
    """The data dir holds state of another cluster."""


def claim(data_dir: Path, cluster_id: str, incarnation: str, ephemeral_broker: bool) -> bool:
    """Make `data_dir` this cluster's; True when a stale one was cleared."""
    marker = data_dir / MARKER
    mine = {"cluster_id": cluster_id, "incarnation": incarnation}
    if marker.exists():
        try:
            theirs = orjson.loads(marker.read_bytes())
        except orjson.JSONDecodeError:
            theirs = {}
        if theirs == mine:
            return False
        if not ephemeral_broker:
            raise ForeignDataDir(
                f"data dir {data_dir} holds state of cluster {theirs.get('cluster_id')!r} "
                f"(incarnation {theirs.get('incarnation')!r}), not of {cluster_id!r} (incarnation {incarnation!r}): "
                "point NUDGEFLOW_DATA_DIR at an empty directory (state is restored from the changelog) "
                "or delete this one"
            )
        log.warning("data dir %s belongs to an in-memory broker that is gone: starting fresh", data_dir)
        shutil.rmtree(data_dir)
        cleared = True
    else:
        cleared = False
    data_dir.mkdir(parents=True, exist_ok=True)
    marker.write_bytes(orjson.dumps(mine))
    return cleared
