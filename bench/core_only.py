"""The hot path without Kafka or Faust: decode + align-free batch apply + engine + RocksDB WriteBatch.

    .venv/bin/python bench/core_only.py [--n 200000] [--users 20000] [--batch 1000]

Same event mix as the peer benchmark (seed 42, 70 % add_to_cart / 30 % charged, +1 ms per event,
30 s wait). Prints events/s of BatchCore.run with state in a real rocksdict DB (one WriteBatch
per batch), i.e. the per-event cost nudgeflow adds on top of the consumer it runs under.
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from pathlib import Path

import orjson
from rocksdict import Options, Rdict, WriteBatch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from nudgeflow.agents.batch import BatchCore, Message  # noqa: E402
from nudgeflow.engine.loader import load_texts  # noqa: E402
from nudgeflow.streams.events import Decoder  # noqa: E402
from nudgeflow.streams.topics import Topics  # noqa: E402

JOURNEY = """\
journey: peers-cart
name: cart
entry: {event: add_to_cart, while_active: restart}
goal: {event: charged}
exit_when: [{event: charged}]
steps:
  wait: {wait: 30s}
  push: {send: push, title: "{{ trigger.product }}"}
"""


class Store:
    def __init__(self, path: str) -> None:
        self.db = Rdict(path, Options(raw_mode=True))

    def get_many(self, partition: int, keys: list[bytes]) -> list[bytes | None]:
        result: list[bytes | None] = self.db.get(keys)
        return result


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=200_000)
    ap.add_argument("--users", type=int, default=20_000)
    ap.add_argument("--batch", type=int, default=1000)
    a = ap.parse_args()
    rng = random.Random(42)
    ts0 = 1_767_225_600_000
    msgs = []
    for i in range(a.n):
        user = f"u{rng.randrange(a.users):05d}"
        add = rng.random() < 0.7
        ev = {
            "user_id": user,
            "event": "add_to_cart" if add else "charged",
            "ts": ts0 + i,
            "props": {"product": f"sku{rng.randrange(1000):04d}", "price": round(rng.uniform(5, 200), 2)},
        }
        msgs.append(Message(str(ev["event"]), 0, i, user.encode(), orjson.dumps(ev), ts0 + i))
    core = BatchCore(load_texts({"cart.yaml": JOURNEY}), Topics(), Decoder(), clock=lambda: ts0 / 1000)
    with tempfile.TemporaryDirectory() as d:
        store = Store(d)
        sends = 0
        t = time.perf_counter()
        for i in range(0, a.n, a.batch):
            out = core.run(msgs[i : i + a.batch], store)
            wb = WriteBatch(raw_mode=True)
            for writes in out.writes.values():
                for k, v in writes:
                    if v is None:
                        wb.delete(k)
                    else:
                        wb.put(k, v)
            store.db.write(wb)
            sends += sum(out.sends.values())
        secs = time.perf_counter() - t
        store.db.close()
    print(
        f"core only: {a.n:,} events in {secs:.2f} s = {a.n / secs:,.0f} events/s "
        f"({secs / a.n * 1e6:.1f} µs/event), batch {a.batch}, {sends:,} sends fired lazily by later events "
        "(no timer scanner here)"
    )


if __name__ == "__main__":
    main()
