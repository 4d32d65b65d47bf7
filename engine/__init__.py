"""The journey engine: pure Python, no Kafka, Faust or RocksDB (a test keeps it so).

Journey files are loaded and validated (`loader`, `schema`), compiled once into an immutable
graph (`compiler` -> `graph`), and run by `core.process(state, input, now) -> Result(state,
effects)` over one user's typed state (`state`). Inputs and effects are plain data (`io`).
Everything here is deterministic and driven by the caller's clock, so the same code serves the
Kafka worker, the `simulate` command and the unit tests.

Adding a step kind (the type checker walks you through most of it: every dispatch over step
kinds is a `match` ending in `assert_never`):
1. `schema.py`: a `<Kind>Step` model, added to `StepModel` and `STEP_KINDS`; re-export
   `journeys/journey.schema.json` (`nudgeflow schema > journeys/journey.schema.json`; a test
   checks it is current).
2. `graph.py`: a frozen node dataclass, added to `Node` (and to `BLOCKING` if it waits).
3. `compiler.py`: `_Steps.compile_<kind>` and its case in `_Steps.node`; its successors in
   `_successors` (references and reachability are checked from there).
4. `core.py`: a `run_<kind>` method and its case in `_Run.run_step` (return the next step id,
   or None after setting `inst["wake"]` or leaving); if it waits, its case in `_Run.wake`.
5. A new effect, if any: a dataclass in `io.py` added to `Effect`, then its case in
   `agents.batch.BatchCore._effects` and its wire format in `streams.wire`.
6. README "Journey language", and a timeline test in `tests/unit/test_language.py`.
"""
