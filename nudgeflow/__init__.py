"""The nudgeflow command line, settings, embedded broker and demo: the shell around the engine."""

__version__ = "0.1.0"
