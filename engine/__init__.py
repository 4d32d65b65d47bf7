"""The journey engine: pure Python, no Kafka, Faust or RocksDB.

Journey files are loaded and validated (`engine.loader`), compiled once into an immutable graph
(`engine.graph`), and run by `engine.core.process(state, input, now) -> Result(state, effects)`.
Everything here is deterministic and driven by the caller's clock, so the same code serves the
Kafka worker, the `simulate` command and the unit tests.
"""
