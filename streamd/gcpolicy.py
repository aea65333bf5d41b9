"""Keeping the cycle collector's pauses out of the delivery path.

CPython's cycle collector stops the event loop while it scans: a full
collection scans every tracked object, about 30 per open connection plus
tens of thousands from the imported modules. On the benchmark machine a full
collection of a gateway holding 1,000 connections (52k objects) took
24-71 ms; it grows with the heap, so with 100k connections it would stop
every socket for seconds.

Long-lived objects need no scanning: a connection leaves no reference cycle
behind when it closes (tests/test_gc_policy.py), so reference counting frees
it, frozen or not. So a server process freezes its heap once started
(`gc.freeze()`: those objects are never scanned again) and then every
`FREEZE_EVERY_S`, so that young and middle collections still reclaim the
short-lived cycles (exceptions, futures) while full collections only scan
what was promoted since the last freeze. Whatever cyclic garbage got frozen
meanwhile is reclaimed by one full collection of everything every
`gc_full_collect_seconds` (setting; 0 leaves CPython's defaults alone).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import time
from collections.abc import AsyncIterator

FREEZE_EVERY_S = 5.0


@contextlib.asynccontextmanager
async def frozen_heap(full_collect_seconds: float) -> AsyncIterator[None]:
    """While inside: the process's heap frozen as described above."""
    if full_collect_seconds <= 0:
        yield
        return
    gc.collect()
    gc.freeze()
    task = asyncio.create_task(_keep_frozen(full_collect_seconds), name="streamd-gc")
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        gc.unfreeze()


async def _keep_frozen(full_collect_seconds: float) -> None:
    last_full = time.monotonic()
    while True:
        await asyncio.sleep(FREEZE_EVERY_S)
        if time.monotonic() - last_full >= full_collect_seconds:
            gc.unfreeze()
            gc.collect()
            last_full = time.monotonic()
        gc.freeze()
