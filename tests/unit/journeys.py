"""Helpers for journey tests: load seed/example journeys, build events, read times."""

from __future__ import annotations

from pathlib import Path

from nudgeflow.engine.graph import JourneySet
from nudgeflow.engine.loader import load_journeys, load_texts

ROOT = Path(__file__).resolve().parents[2]
T0 = 1_767_225_600_000  # 2026-01-01T00:00:00Z
S, M, H, D = 1000, 60_000, 3_600_000, 86_400_000


def seeds(*names: str) -> JourneySet:
    return load_journeys([ROOT / "journeys" / "seeds" / n for n in names])


def texts(**docs: str) -> JourneySet:
    return load_texts({f"{k}.yaml": v for k, v in docs.items()})
