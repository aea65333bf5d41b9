"""Minimal peer servers for `python -m bench compare`, each the idiomatic way to do
"subscribe to a room; a post is broadcast to it via Redis across processes".

They run from bench/.venv-peers (`python -m bench setup`), never from the
project's own environment. Each server prints `listening on http://HOST:PORT`
once it accepts connections, and each has a publisher (`python -m bench.publish`
or `node publisher.js`) that reaches it only through Redis.
"""
