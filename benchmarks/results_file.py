"""Shared by the benchmark scripts: a median timing, and printing a result table and appending it to its results
file."""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Callable


def publish(table: str, out: str | Path, title: str | None = None) -> None:
    """Print `table` and append it to `out`; a new file starts with `title` (a heading line), if given."""
    print(table)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if title is not None and not out.exists():
        out.write_text(title)
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
