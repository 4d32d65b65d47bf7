"""The worker's batch core over a corpus, digested: the equivalence check for hot-path changes.

    .venv/bin/python bench/corpus.py --out /tmp/corpus --users 600 --events 12000
    .venv/bin/python bench/batch_digest.py --corpus /tmp/corpus

`nudgeflow simulate` over the corpus checks the engine alone; this checks what the worker does
around it: decoding, the per-user fast path (in place, with the known wake-up), due timers fired
as ticks, the timer index, occupancy, the send requests' bytes and headers, every count. Events
and profile updates go through `BatchCore` and a real RocksDB (`StateStore`) in batches, in event
time order; each batch's timers fire in the next one, as the worker's scanner fires them. Prints
one md5 over every record produced, every write (store and changelog), every timer-index
operation and every batch's counts. Run it before and after a change (the code before from a
`git archive` with `PYTHONPATH`): the digests must be equal.
"""

from __future__ import annotations

import argparse
import hashlib
import inspect
import sys
import tempfile
from pathlib import Path

import orjson

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
from core_only import Table, run  # noqa: E402 - the same loop as the core benchmark, digested

from nudgeflow.agents.batch import BatchCore, BatchOutput, Raw  # noqa: E402
from nudgeflow.agents.keys import USER  # noqa: E402
from nudgeflow.agents.store import StateStore  # noqa: E402
from nudgeflow.engine.loader import load_journeys  # noqa: E402
from nudgeflow.engine.state import recent_sends  # noqa: E402
from nudgeflow.streams.events import Decoder  # noqa: E402
from nudgeflow.streams.topics import CUSTOM_TOPIC, EVENT_TOPICS, PROFILE_TOPIC, Topics  # noqa: E402

RECENT_NEEDS_USER = "user" in inspect.signature(recent_sends).parameters
T0_S = 1_767_225_600.0  # the corpus starts 2026-01-01; "now" for validation


def messages(corpus: Path, topics: Topics) -> list[Raw]:
    """The corpus as input messages keyed by user, on the topic each would come on, by event time."""
    by_name = {name: topics.name(base) for base, name in EVENT_TOPICS.items()}
    msgs: list[tuple[int, Raw]] = []
    for i, line in enumerate((corpus / "events.jsonl").read_bytes().splitlines()):
        ev = orjson.loads(line)
        topic = by_name.get(ev["event"], topics.name(CUSTOM_TOPIC))
        msgs.append((ev.get("ts", 0), Raw(topic, 0, i, str(ev["user_id"]).encode(), line)))
    for i, line in enumerate((corpus / "profiles.jsonl").read_bytes().splitlines()):
        doc = orjson.loads(line)
        msgs.append((doc.get("ts", 0), Raw(topics.name(PROFILE_TOPIC), 0, i, str(doc["user_id"]).encode(), line)))
    msgs.sort(key=lambda m: m[0])  # stable: equal times keep the file order
    return [m for _, m in msgs]


def canonical(key: bytes, value: bytes) -> bytes:
    """A user record with its recent sends as they are read (`recent_sends`: time, journey, step,
    channel, key, trigger), not as they are stored: the digest compares what a record says, so a
    change of the way recent sends are stored (not their content) keeps it."""
    if not key.startswith(USER):
        return value
    rec = orjson.loads(value)
    st = rec["state"]
    if "recent" in st:
        if RECENT_NEEDS_USER:
            st["recent"] = recent_sends(st, key[len(USER) :].decode())
        else:  # a build before recent sends derived their keys (run from a `git archive`)
            st["recent"] = recent_sends(st)  # type: ignore[call-arg]
    return orjson.dumps(rec)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--corpus", type=Path, required=True, help="a directory written by bench/corpus.py")
    ap.add_argument("--journeys", type=Path, default=ROOT / "journeys" / "seeds")
    ap.add_argument("--batch", type=int, default=500)
    a = ap.parse_args()
    topics = Topics()
    msgs = messages(a.corpus, topics)
    core = BatchCore(load_journeys([a.journeys]), topics, Decoder(max_future_ms=10**13), clock=lambda: T0_S)
    h = hashlib.md5(usedforsecurity=False)

    def digest(out: BatchOutput) -> None:
        for r in out.records:
            h.update(b"%s\0%s\0%s\0%s" % (r.topic.encode(), r.key or b"", r.value, repr(r.headers).encode()))
        h.update(repr(sorted(out.counts.items())).encode())
        for changes in (out.writes, out.local):
            for _, ops in sorted(changes.items()):
                for k, v in ops:
                    h.update(k + b"\0" + (canonical(k, v) if v is not None else b"-"))

    with tempfile.TemporaryDirectory() as d:
        table = Table(d)
        run(core, StateStore(table), msgs, a.batch, on_batch=digest)
        keys = sum(1 for _ in table.db.items())
        table.db.close()
    print(f"digest {h.hexdigest()}  ({len(msgs):,} inputs, {keys:,} keys in the store)")


if __name__ == "__main__":
    main()
