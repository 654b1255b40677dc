"""Wall and CPU time of each stage of `make demo`, with the machine and its load, so that
docs/demo.md can quote figures that say where they were measured."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

console = Console()


class Stages:
    """Wall and CPU time of each demo stage (the CPU time includes finished child processes:
    vLLM), printed as it ends and summarised with the machine and its load at the end."""

    def __init__(self, record: Path, settings: dict[str, Any]) -> None:
        self.record, self.settings = record, settings
        self.rows: list[dict[str, Any]] = []
        self.t0 = time.perf_counter()
        self.load_start = os.getloadavg()

    @contextmanager
    def __call__(self, title: str, rule: bool = True) -> Iterator[None]:
        if rule:
            console.rule(f"[bold]{title}")
        t, c = time.perf_counter(), _cpu_s()
        yield
        row = {"stage": title, "wall_s": time.perf_counter() - t, "cpu_s": _cpu_s() - c}
        self.rows.append(row)
        console.print(
            f"[dim]{title}: {row['wall_s']:.0f} s wall, {row['cpu_s']:.0f} s CPU "
            f"(load average {os.getloadavg()[0]:.1f})[/dim]"
        )

    def summary(self, compute: str) -> Table:
        total = time.perf_counter() - self.t0
        table = Table(title=f"demo stages ({machine()}; {compute})")
        for col in ("stage", "wall s", "CPU s"):
            table.add_column(col, justify="left" if col == "stage" else "right")
        for r in self.rows:
            table.add_row(r["stage"], f"{r['wall_s']:.0f}", f"{r['cpu_s']:.0f}")
        table.add_row("total", f"{total:.0f}", f"{_cpu_s():.0f}")
        doc = {
            "machine": machine(),
            "compute": compute,
            "settings": self.settings,
            "stages": self.rows,
            "total_wall_s": total,
            "total_cpu_s": _cpu_s(),
            "load_average_start": self.load_start,
            "load_average_end": os.getloadavg(),
        }
        self.record.write_text(json.dumps(doc, indent=2))
        return table


def _cpu_s() -> float:
    import resource

    usage = (resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN))
    return sum(u.ru_utime + u.ru_stime for u in usage)


def machine() -> str:
    """CPU model, core count and torch's reported capability, for the timing record."""
    import torch

    from composer.precision import cpu_flags

    model = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    flags = cpu_flags() or frozenset()
    bf16 = ",".join(sorted(f for f in ("avx512_bf16", "amx_bf16") if f in flags)) or "no bf16 flags"
    isa = torch.backends.cpu.get_cpu_capability()
    return f"{model}, {os.cpu_count()} cores, torch {isa}, {bf16}"
