"""The input side: topic names, the event schema, and validation at the edge.

Bytes from Kafka become engine inputs here, or a typed rejection (`Invalid`) that the worker sends
to the dead-letter topic. No Kafka client is imported: this is plain decoding, used by the
worker, the simulator and the demo alike.
"""
