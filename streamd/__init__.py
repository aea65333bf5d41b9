"""streamd: posts on Redis Streams, fanned out live over WebSockets."""

__version__ = "0.1.0"
