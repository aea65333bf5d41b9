"""The ASGI application: WebSockets at /ws/ go to RoomConsumer."""

from __future__ import annotations

import os

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "bench.peers.channels_app.settings")

import django  # type: ignore[import-not-found, import-untyped, unused-ignore]  # peers venv only  # noqa: E402

django.setup()

from channels.routing import ProtocolTypeRouter, URLRouter  # type: ignore[import-not-found, import-untyped, unused-ignore]  # peers venv only  # noqa: E402
from django.urls import path  # type: ignore[import-not-found, import-untyped, unused-ignore]  # peers venv only  # noqa: E402

from bench.peers.channels_app.consumers import RoomConsumer  # noqa: E402

application = ProtocolTypeRouter({"websocket": URLRouter([path("ws/", RoomConsumer.as_asgi())])})
