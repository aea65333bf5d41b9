"""Django Channels 4 with the channels_redis pub/sub layer, served by uvicorn.

    uvicorn bench.peers.channels_app.asgi:application --loop uvloop --no-access-log ...

with `BENCH_REDIS_URL` in the environment. A client sends
`{"op": "join", "room": R}` and gets `{"op": "joined"}`; posts arrive as the
JSON text a publisher put in `group_send` (`bench.publish`), unchanged.
"""
