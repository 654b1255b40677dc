"""What a sweep leaves: a results table (printed), results.json, a PNG of the chosen metric per
candidate (failed candidates marked), and best.yaml, the winning candidate's spec."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from composer.eval.figures import _save
from composer.sweep.spec import Sweep, SweepError


def metric_of(row: dict[str, Any], metric: str) -> float | None:
    """``mean_perplexity`` or ``perplexity.<domain>`` of a row (None for a failed one)."""
    if not row.get("ok"):
        return None
    if metric == "mean_perplexity":
        return float(row["mean_perplexity"])
    domain = metric.removeprefix("perplexity.")
    if metric.startswith("perplexity.") and domain in row["perplexity"]:
        return float(row["perplexity"][domain])
    raise SweepError(
        f"select.metric: {metric!r}; expected mean_perplexity or perplexity.<domain> "
        f"(domains: {', '.join(row['perplexity'])})"
    )


def best_row(rows: list[dict[str, Any]], metric: str, mode: str) -> dict[str, Any] | None:
    scored = [(v, r) for r in rows if (v := metric_of(r, metric)) is not None and math.isfinite(v)]
    if not scored:
        return None
    pick = min if mode == "min" else max
    return pick(scored, key=lambda vr: vr[0])[1]


def table(rows: list[dict[str, Any]], metric: str, best: dict[str, Any] | None) -> str:
    """A plain-text table: one line per candidate, its overrides, perplexities or its error."""
    domains = sorted({d for r in rows if r.get("ok") for d in r["perplexity"]})
    head = ["", "candidate", "overrides", *domains, "mean", "build s", "eval s"]
    lines = []
    for r in rows:
        over = ", ".join(f"{k}={v}" for k, v in r["overrides"].items())
        mark = "*" if best is not None and r["label"] == best["label"] else ""
        if r.get("ok"):
            cells = [f"{r['perplexity'][d]:.3f}" for d in domains]
            cells += [f"{r['mean_perplexity']:.3f}", f"{r['build_s']:.1f}", f"{r['eval_s']:.1f}"]
        else:
            cells = [f"FAILED: {r['error']}"]
        lines.append([mark, r["label"], over, *cells])
    widths = [max(len(x[i]) for x in [head, *lines] if i < len(x)) for i in range(len(head))]
    fmt = [
        "  ".join(c.ljust(widths[i]) if i < len(widths) - 1 else c for i, c in enumerate(x))
        for x in [head, *lines]
    ]
    foot = f"* best by {metric}" if best is not None else f"no candidate succeeded ({metric})"
    return "\n".join([*fmt, foot])


def plot(rows: list[dict[str, Any]], metric: str, path: Path, title: str) -> Path:
    """Bars of ``metric`` per candidate; a failed candidate is an empty slot marked 'failed'."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [r["label"] for r in rows]
    values = [metric_of(r, metric) for r in rows]
    fig, ax = plt.subplots(figsize=(max(4.0, 0.9 * len(rows) + 1.5), 3.2))
    try:
        xs = range(len(rows))
        ax.bar(xs, [v if v is not None else 0.0 for v in values], color="#4c72b0")
        top = max([v for v in values if v is not None], default=1.0)
        for x, v in zip(xs, values, strict=True):
            text = "failed" if v is None else f"{v:.2f}"
            ax.text(x, (v or 0.0) + 0.01 * top, text, ha="center", va="bottom", fontsize=8)
        ax.set_xticks(list(xs), labels)
        ax.set_ylabel(metric)
        ax.set_title(title)
        return _save(fig, path)
    finally:
        plt.close(fig)


def write_report(sweep: Sweep, rows: list[dict[str, Any]], out: Path) -> dict[str, Any]:
    """results.json, sweep.png and best.yaml in ``out``; returns the summary."""
    sel = sweep.spec.select
    best = best_row(rows, sel.metric, sel.mode)
    png = plot(rows, sel.metric, out / "sweep.png", f"{sweep.path.name}: {sel.metric}")
    best_yaml = None
    if best is not None:
        cand = next(c for c in sweep.candidates if c.label == best["label"])
        best_yaml = out / "best.yaml"
        head = (
            f"# Best candidate {cand.label} of {sweep.path} by {sel.metric} ({sel.mode}).\n"
            f"# Relative paths in it are relative to {sweep.base_path.parent}.\n"
        )
        best_yaml.write_text(head + cand.spec_text)
    summary = {
        "sweep": str(sweep.path),
        "select": sel.model_dump(),
        "best": best["label"] if best else None,
        "best_spec": str(best_yaml) if best_yaml else None,
        "plot": str(png),
        "candidates": [{k: v for k, v in r.items() if k != "traceback"} for r in rows],
    }
    (out / "results.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary
