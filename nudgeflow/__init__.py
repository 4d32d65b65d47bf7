"""nudgeflow: a real-time customer-journey engine on Kafka.

One import package. Its parts live at the top of the repository and import as subpackages
(symbolic links here): `nudgeflow.engine` (the pure journey engine), `nudgeflow.streams` (topics
and wire formats), `nudgeflow.agents` (the Faust worker), `nudgeflow.channels` (senders and the
call runner). The modules directly in this folder are the shell: command line, settings,
embedded broker, demo, simulate and enroll.
"""

__version__ = "0.1.0"

from nudgeflow import compiled as _compiled

_compiled.install()  # before any hot module loads: stale or NUDGEFLOW_PURE=1 -> from source
