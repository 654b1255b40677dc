"""The opt-out matrix: every domain's perplexity with one expert excluded, per expert.

FlexOlmo's claim is that excluding an expert returns its domain toward the public model and
leaves the others nearly unchanged; this measures it on the served engine. Each row is a pass
with the evaluated set minus one expert, chosen through the scorer's policy (so a row never
uses an expert the registry does not grant); an expert that is the only one left has no row.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from composer.eval.scoring import Scorer, domain_perplexities


def opt_out_rows(allowed: Sequence[str]) -> list[str]:
    """Experts that get a row: each of ``allowed`` when another one is left."""
    return list(allowed) if len(allowed) > 1 else []


def opt_out_matrix(
    scorer: Scorer,
    chunks: Mapping[str, Sequence[Sequence[int]]],
    allowed: Sequence[str],
    full: Mapping[str, float],
    on_batch: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """{"experts", "domains", "perplexity": {expert: {domain: ppl}}, "relative_change":
    {expert: {domain: ppl / full - 1}}} for the set ``allowed`` whose perplexities are
    ``full``."""
    ppl: dict[str, dict[str, float]] = {}
    for expert in opt_out_rows(allowed):
        rest = scorer.select({"include": [n for n in allowed if n != expert]})
        ppl[expert] = domain_perplexities(scorer, chunks, rest, on_batch)
    change = {e: {d: row[d] / full[d] - 1.0 for d in row} for e, row in ppl.items()}
    return {
        "experts": list(ppl),
        "domains": list(chunks),
        "perplexity": ppl,
        "relative_change": change,
    }
