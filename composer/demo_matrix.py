"""The demo's opt-out matrix: each domain's held-out perplexity with one owner's expert excluded.

FlexOlmo's promise to data owners is that opting out removes what their data contributed and
nothing else: excluding an expert should return its own domain toward the public model and
leave the other domains nearly unchanged. The demo shows it on the build it just made, in
transformers with the serving mask (composer.eval.routing.load_masked: router bias plus -inf
for the excluded expert, as vLLM applies it) on the same held-out chunks as the perplexity
table. `composer eval --opt-out-matrix` measures the same through vLLM (docs/eval.md).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import torch
from rich.table import Table


def opt_out_table(
    composed: Path,
    heldout: Mapping[str, torch.Tensor],
    full: Mapping[str, float],
    public: Mapping[str, float],
) -> tuple[Table, dict[str, dict[str, float]]]:
    """A row per owner's expert: each domain's perplexity without it, and its change against
    the full build; the expert's own domain is marked, with the public model's figure beside."""
    from composer.eval.routing import load_masked
    from composer.train.evaluate import perplexity

    names = list(json.loads((composed / "config.json").read_text())["composer_experts"])
    owners = [n for n in names[1:] if n in heldout]  # slot 0 is the public model
    rows: dict[str, dict[str, float]] = {}
    for expert in owners:
        model = load_masked(composed, names, [n for n in names if n != expert])[0]
        rows[expert] = {d: perplexity(model, chunks) for d, chunks in heldout.items()}
    table = Table(title="opt-out matrix: perplexity without one expert (change vs full build)")
    table.add_column("excluded")
    for d in heldout:
        table.add_column(d, justify="right")
    for expert, row in rows.items():
        cells = []
        for d, ppl in row.items():
            cell = f"{ppl:.2f} ({100 * (ppl / full[d] - 1):+.1f}%)"
            cells.append(f"[bold]{cell}[/bold] public {public[d]:.2f}" if d == expert else cell)
        table.add_row(expert, *cells)
    return table, rows
