"""Pure helpers for the results: percentiles and CPU arithmetic. No I/O."""

from __future__ import annotations

import math
from collections.abc import Sequence

PERCENTILES: tuple[tuple[str, float], ...] = (("p50", 50.0), ("p90", 90.0), ("p99", 99.0), ("p99.9", 99.9))


def percentile(ordered: Sequence[int], q: float) -> int:
    """Nearest-rank percentile of an ascending sequence (a value that was observed)."""
    if not ordered:
        raise ValueError("no samples")
    rank = math.ceil(q / 100.0 * len(ordered))
    return ordered[min(max(rank, 1), len(ordered)) - 1]


def summary_ms(samples_ns: Sequence[int]) -> dict[str, float | int | None]:
    """count, p50..p99.9, max and mean in milliseconds; None where there are no samples."""
    out: dict[str, float | int | None] = {"count": len(samples_ns)}
    if not samples_ns:
        out.update({name: None for name, _ in PERCENTILES})
        out.update(max=None, mean=None)
        return out
    ordered = sorted(samples_ns)
    for name, q in PERCENTILES:
        out[name] = round(percentile(ordered, q) / 1e6, 3)
    out["max"] = round(ordered[-1] / 1e6, 3)
    out["mean"] = round(sum(ordered) / len(ordered) / 1e6, 3)
    return out


def cpu_percent(ticks: int, clock_ticks: int, seconds: float) -> float:
    """CPU time in clock ticks over a wall-clock span, as % of one core."""
    return 100.0 * ticks / clock_ticks / seconds if seconds > 0 else 0.0


def micros_per(ticks: int, clock_ticks: int, count: int) -> float | None:
    """CPU time in clock ticks spread over `count` events, in microseconds each."""
    return 1e6 * ticks / clock_ticks / count if count > 0 else None
