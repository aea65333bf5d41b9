"""Memory held by connections is given back by reference counting alone."""

from __future__ import annotations

import asyncio
import gc
from typing import Any

from streamd.wssocket import WebSocket
from tests.helpers import Api


def _instances(kind: type) -> set[int]:
    return {id(o) for o in gc.get_objects() if type(o) is kind}


async def test_a_closed_connection_leaves_no_cycle_behind(api: Api, ws_connect: Any) -> None:
    token = await api.user("jane")
    gc.collect()
    gc.disable()
    try:
        before = _instances(WebSocket)  # other tests' connections, if any are left
        clients = [await ws_connect() for _ in range(20)]
        for c in clients:
            await c.subscribe("user:jane")
        await api.post(token, "hello")
        for c in clients:
            assert (await c.recv())["op"] == "post"
        assert len(_instances(WebSocket) - before) >= 20
        for c in clients:
            await c.ws.close()
        async with asyncio.timeout(10):
            while _instances(WebSocket) - before:
                await asyncio.sleep(0.02)
    finally:
        gc.enable()


class _Node:
    def __init__(self) -> None:
        self.me = self  # a reference cycle: only the cycle collector frees it


async def test_the_heap_is_frozen_and_frozen_cycles_are_still_reclaimed(monkeypatch: Any) -> None:
    import weakref

    from streamd import gcpolicy

    monkeypatch.setattr(gcpolicy, "FREEZE_EVERY_S", 0.05)
    assert gc.get_freeze_count() == 0
    async with gcpolicy.frozen_heap(full_collect_seconds=0.3):
        node = _Node()
        ref = weakref.ref(node)
        frozen = gc.get_freeze_count()
        async with asyncio.timeout(5):
            while gc.get_freeze_count() <= frozen:  # the next periodic freeze takes the node too
                await asyncio.sleep(0.01)
        del node
        gc.collect()
        assert ref() is not None  # frozen: no ordinary collection looks at it
        async with asyncio.timeout(5):
            while ref() is not None:  # until the periodic collection of everything
                await asyncio.sleep(0.02)
    assert gc.get_freeze_count() == 0


async def test_a_zero_period_leaves_the_collector_alone() -> None:
    from streamd import gcpolicy

    async with gcpolicy.frozen_heap(full_collect_seconds=0):
        assert gc.get_freeze_count() == 0
