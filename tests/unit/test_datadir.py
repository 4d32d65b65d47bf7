"""A data dir belongs to one cluster (agents.datadir)."""

from __future__ import annotations

from pathlib import Path

import pytest

from nudgeflow.agents.datadir import ForeignDataDir, claim


def test_a_data_dir_is_claimed_once_and_refused_to_another_kafka_cluster(tmp_path: Path) -> None:
    d = tmp_path / "data"
    assert claim(d, "kafka-a", "inc-1", ephemeral_broker=False) is False
    (d / "state").write_text("x")
    assert claim(d, "kafka-a", "inc-1", ephemeral_broker=False) is False and (d / "state").exists()
    with pytest.raises(ForeignDataDir, match=r"holds state of cluster 'kafka-a'.*NUDGEFLOW_DATA_DIR"):
        claim(d, "kafka-b", "inc-9", ephemeral_broker=False)
    assert (d / "state").exists()  # nothing removed


def test_a_data_dir_of_a_gone_in_memory_broker_starts_fresh(tmp_path: Path) -> None:
    d = tmp_path / "data"
    claim(d, "tansu_cluster", "run-1", ephemeral_broker=True)
    (d / "state").write_text("x")
    assert claim(d, "tansu_cluster", "run-2", ephemeral_broker=True) is True
    assert not (d / "state").exists() and (d / "cluster.json").exists()
