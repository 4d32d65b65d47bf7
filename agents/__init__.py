"""The Kafka side: the Faust app, the journey agent, the state store, timers and metrics.

Thin adapters around the pure engine. The batch logic itself (`agents.batch`) has no Faust in it,
so the same code runs under the worker, in benchmarks and in tests.
"""
