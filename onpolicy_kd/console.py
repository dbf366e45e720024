"""What the user sees: errors without tracebacks, the dry-run summary. rich is for the console only."""

from __future__ import annotations

import os
from typing import Any

from rich.console import Console
from rich.table import Table
from rich.text import Text

console = Console(highlight=False)
err_console = Console(stderr=True, highlight=False)


def is_main_process() -> bool:
    """Rank 0 under accelerate/torchrun (RANK is set by the launcher), or a plain single process."""
    return os.environ.get("RANK", "0") == "0"


def print_error(err: BaseException) -> None:
    # Text(...) so brackets in messages ("[0, 1)") are never read as rich markup.
    err_console.print(Text("error: ", style="bold red") + Text(str(err)), soft_wrap=True)


def summary_table(rows: list[tuple[str, dict[str, Any]]], title: str) -> Table:
    """One row per item (teacher, student, train data, ...), columns from the union of their keys."""
    columns: list[str] = []
    for _, values in rows:
        columns += [k for k in values if k not in columns]
    table = Table(title=title, title_justify="left")
    table.add_column("")
    for column in columns:
        table.add_column(column, overflow="fold")
    for name, values in rows:
        table.add_row(name, *(_fmt(values.get(c, "")) for c in columns))
    return table


def _fmt(value: Any) -> str:
    if isinstance(value, int) and not isinstance(value, bool) and value >= 10_000:
        return f"{value:,}"
    return str(value)
