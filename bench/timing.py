"""Timing for the bench/ scripts: one untimed warm-up call, then `n` timed calls."""

from __future__ import annotations

import time
from collections.abc import Callable


def _runs(fn: Callable[[], object], n: int) -> list[float]:
    fn()
    times = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return sorted(times)


def median_ms(fn: Callable[[], object], n: int = 7) -> float:
    """The median call in milliseconds."""
    return _runs(fn, n)[n // 2] * 1e3


def best_ms(fn: Callable[[], object], n: int = 5) -> float:
    """The fastest call in milliseconds."""
    return _runs(fn, n)[0] * 1e3
