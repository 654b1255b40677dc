"""Printing: `--json` gives exactly one JSON document on stdout; otherwise rich tables."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from rich.console import Console
from rich.table import Table

console = Console()
# Messages are never wrapped: an error stays one line, a printed path stays copyable.
err_console = Console(stderr=True, soft_wrap=True)


def print_json(doc: Any) -> None:
    sys.stdout.write(json.dumps(doc, indent=2, sort_keys=True, default=str) + "\n")


def print_table(title: str, rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> None:
    table = Table(title=title, title_justify="left")
    for c in columns:
        table.add_column(c)
    for r in rows:
        table.add_row(*(_cell(r.get(c)) for c in columns))
    console.print(table)


def _cell(v: Any) -> str:
    if v is None:
        return "-"
    s = str(v)
    return s[:12] if len(s) == 64 and all(ch in "0123456789abcdef" for ch in s) else s


@contextmanager
def stdout_to_stderr() -> Iterator[None]:
    """Send everything written to file descriptor 1 (engine logs, child processes) to stderr
    while the block runs, so `--json` leaves exactly one document on stdout."""
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)
