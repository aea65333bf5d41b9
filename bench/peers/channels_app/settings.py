"""The least Django that Channels needs: no database, no apps beyond channels."""

from __future__ import annotations

import os

SECRET_KEY = "bench-not-secret"
DEBUG = False
ALLOWED_HOSTS = ["*"]
INSTALLED_APPS = ["channels"]
ASGI_APPLICATION = "bench.peers.channels_app.asgi.application"
USE_TZ = True
LOGGING_CONFIG = None
CHANNEL_LAYERS = {
    "default": {
        # The pub/sub layer: one Redis channel per group, fanned out in-process.
        # Its per-channel queues are unbounded asyncio.Queues (the core
        # RedisChannelLayer instead drops past `capacity`, default 100).
        "BACKEND": "channels_redis.pubsub.RedisPubSubChannelLayer",
        "CONFIG": {
            "hosts": [
                {
                    "address": os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/0"),
                    # redis-py's pool raises past max_connections instead of waiting.
                    "max_connections": 1024,
                }
            ],
        },
    }
}
