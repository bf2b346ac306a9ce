"""sse-fanout: a Server-Sent Events push gateway fanned out over Redis pub/sub."""

__version__ = "0.1.0"
