"""One evaluation: read and tokenise the data (no engine needed, so bad input fails in seconds),
then score each domain with the chosen experts, optionally the opt-out matrix and routing, and
write the figures. The result is one JSON-ready report that the CLI prints and records.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from composer.eval.data import Domain, domain_chunks, parse_data_args
from composer.eval.figures import opt_out_heatmap, routing_heatmap
from composer.eval.matrix import opt_out_matrix, opt_out_rows
from composer.eval.routing import routing_stats
from composer.eval.scoring import Scorer, domain_perplexities
from composer.progress import bar
from composer.text import checkpoint_tokenizer
from registry.checkpoint import hash_file
from registry.errors import ComposerError


class EvalOptions(BaseModel):
    """What to measure and where figures go."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    seq_len: int = Field(128, ge=2, description="tokens per scored chunk")
    max_chunks: int = Field(16, ge=1, description="chunks per domain at most")
    opt_out_matrix: bool = False
    routing: bool = False
    out_dir: Path = Path("composer-eval")
    label: str = "model"  # file name stem of the figures
    progress: bool = True


@dataclass(frozen=True)
class EvalData:
    """Domains and their token chunks, ready to score."""

    domains: list[Domain]
    chunks: dict[str, list[list[int]]]


def prepare(model_dir: str | Path, data_args: Sequence[str], options: EvalOptions) -> EvalData:
    """Check the options against the model, resolve `--data` and tokenise it with the
    checkpoint's tokenizer (composer/text.py): everything that can fail before the engine."""
    config = json.loads((Path(model_dir) / "config.json").read_text())
    positions = config.get("max_position_embeddings")
    if positions and options.seq_len + 1 > int(positions):
        raise ComposerError(
            f"--seq-len {options.seq_len}: a chunk and the one token the engine generates must "
            f"fit the model's {positions} positions (max_position_embeddings)"
        )
    figures = options.opt_out_matrix or options.routing
    if figures and options.out_dir.exists() and not options.out_dir.is_dir():
        raise ComposerError(f"--out {options.out_dir}: exists and is not a folder")
    domains = parse_data_args(data_args)
    tok = checkpoint_tokenizer(model_dir, int(config["vocab_size"]))
    chunks = {d.name: domain_chunks(d, tok, options.seq_len, options.max_chunks) for d in domains}
    return EvalData(domains, chunks)


def choose_experts(scorer: Scorer, experts: Any) -> tuple[str, ...]:
    """The experts `--experts` asks for, as the policy grants them (errors name the flag)."""
    try:
        return scorer.select(experts)
    except ComposerError as e:
        raise ComposerError(f"--experts: {e}") from None


def run_eval(
    scorer: Scorer, model_dir: str | Path, data: EvalData, experts: Any, options: EvalOptions
) -> dict[str, Any]:
    """Score every domain; the report holds figures, data hashes, the mask and PNG paths."""
    start = time.monotonic()
    allowed = choose_experts(scorer, experts)
    rows = opt_out_rows(allowed) if options.opt_out_matrix else []
    total = (1 + len(rows)) * sum(len(c) for c in data.chunks.values())
    with bar(total, "composer eval", options.progress, unit="chunk") as progress:
        full = domain_perplexities(scorer, data.chunks, allowed, progress.update)
        matrix = (
            opt_out_matrix(scorer, data.chunks, allowed, full, progress.update)
            if options.opt_out_matrix
            else None
        )
    routing = None
    if options.routing:
        routing = routing_stats(model_dir, data.chunks, scorer.names, allowed)
    figures: dict[str, dict[str, str]] = {}
    out_dir = options.out_dir.resolve()
    if matrix is not None and matrix["experts"]:
        path = out_dir / f"{options.label}-opt-out.png"
        opt_out_heatmap(matrix, path, f"{options.label}: perplexity without one expert")
        figures["opt_out_matrix"] = {"path": str(path), "sha256": hash_file(path)[0]}
    if routing is not None and any(routing.values()):
        path = out_dir / f"{options.label}-routing.png"
        routing_heatmap(routing, scorer.names, path, f"{options.label}: routing")
        figures["routing"] = {"path": str(path), "sha256": hash_file(path)[0]}
    return {
        "model": str(model_dir),
        "experts": {"request": experts, "used": list(allowed), "model": list(scorer.names)},
        "data": {
            d.name: {**d.record(), "chunks": len(data.chunks[d.name]), "seq_len": options.seq_len}
            for d in data.domains
        },
        "perplexity": full,
        "opt_out_matrix": matrix,
        "routing": None if routing is None else {"source": "transformers", "layers": routing},
        "figures": figures,
        "wall_s": round(time.monotonic() - start, 3),
    }


def empty_report(model_dir: str | Path, experts: Any) -> dict[str, Any]:
    """The report's shape when no perplexity is asked (`--lm-eval` alone)."""
    return {
        "model": str(model_dir),
        "experts": {"request": experts, "used": [], "model": []},
        "data": {},
        "perplexity": {},
        "opt_out_matrix": None,
        "routing": None,
        "figures": {},
        "wall_s": 0.0,
    }
