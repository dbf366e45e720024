"""Shared by the benchmark scripts: a median timing, and printing a result table and appending it to its results
file."""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Callable


def publish(table: str, out: str | Path) -> None:
    print(table)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    with open(out, "a") as f:
        f.write(table)


def median_time(fn: Callable[[], object], repeat: int = 3) -> float:
    """Median wall time of `repeat` calls of fn, after one warm-up call."""
    fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)
