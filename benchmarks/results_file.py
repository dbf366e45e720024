"""Shared by the benchmark scripts: print a result table and append it to its results file."""

from __future__ import annotations

from pathlib import Path


def publish(table: str, out: str | Path) -> None:
    print(table)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    with open(out, "a") as f:
        f.write(table)
