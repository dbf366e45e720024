"""The run's `metrics.jsonl`: one JSON object per line (`step`, optional `stage`, slash keys).

A run killed mid-write (SIGKILL, a full disk) can leave a torn last line: readers skip it (and say so) instead
of failing. A resumed run first cuts the file back to its checkpoint's step, so the steps it replays are not
written twice.
"""

from __future__ import annotations

import json
import os
from pathlib import Path


def read_metrics(path: str | Path) -> tuple[list[dict], list[int]]:
    """(every complete record, the numbers of the lines that could not be read: a torn last one, usually)."""
    rows, bad = [], []
    with open(path, encoding="utf-8", errors="replace") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                bad.append(number)
    return rows, bad


def truncate_metrics(path: str | Path, last_step: int) -> int:
    """Keep the records up to `last_step` (a checkpoint's step, counted over the whole run) and drop the rest, a
    torn line included; returns how many records were dropped. Written to a temporary file and renamed."""
    path = Path(path)
    if not path.is_file():
        return 0
    kept, dropped = [], 0
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                dropped += 1
                continue
            if record.get("step", 0) <= last_step:
                kept.append(json.dumps(record) + "\n")
            else:
                dropped += 1
    if dropped:
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text("".join(kept), encoding="utf-8")
        os.replace(tmp, path)
    return dropped
