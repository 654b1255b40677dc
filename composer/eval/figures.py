"""Heatmap PNGs of the opt-out matrix and of routing (matplotlib, no display needed).

Files are written to a temporary name in the target folder and renamed, so a failed run never
leaves a half-written image.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any


def _save(fig: Any, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".png", dir=path.parent, prefix=f".{path.stem}-")
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=110, bbox_inches="tight")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def _heatmap(ax: Any, values: list[list[float]], rows: Sequence[str], cols: Sequence[str],
             fmt: str, cmap: str, limits: tuple[float, float] | None) -> Any:  # fmt: skip
    """Cells coloured by value within ``limits`` (default: symmetric around 0), each labelled
    in a colour readable on it."""
    import numpy as np

    data = np.array(values, dtype=float)
    if limits is None:
        span = float(np.nanmax(np.abs(data))) if data.size else 0.0
        limits = (-(span or 1.0), span or 1.0)
    im = ax.imshow(data, cmap=cmap, aspect="auto", vmin=limits[0], vmax=limits[1])
    ax.set_xticks(range(len(cols)), labels=list(cols), rotation=30, ha="right")
    ax.set_yticks(range(len(rows)), labels=list(rows))
    for r in range(data.shape[0]):
        for c in range(data.shape[1]):
            shade = float(im.norm(data[r, c]))
            dark = shade < 0.35 if cmap == "viridis" else abs(shade - 0.5) > 0.3
            color = "white" if dark else "black"
            ax.text(c, r, format(data[r, c], fmt), ha="center", va="center", fontsize=8,
                    color=color)  # fmt: skip
    return im


def opt_out_heatmap(matrix: Mapping[str, Any], path: Path, title: str) -> Path:
    """Rows: excluded expert; columns: domain; cell: perplexity change vs the full set (%)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    experts, domains = matrix["experts"], matrix["domains"]
    values = [[100.0 * matrix["relative_change"][e][d] for d in domains] for e in experts]
    fig, ax = plt.subplots(
        figsize=(2.6 + 1.2 * len(domains), 1.4 + 0.5 * len(experts)), layout="constrained"
    )
    im = _heatmap(ax, values, [f"without {e}" for e in experts], domains, "+.1f", "RdBu_r", None)
    fig.colorbar(im, ax=ax, label="perplexity change vs full (%)")
    ax.set_title(title)
    try:
        return _save(fig, path)
    finally:
        plt.close(fig)


def routing_heatmap(
    routing: Mapping[str, Sequence[Mapping[str, Any]]], names: Sequence[str], path: Path, title: str
) -> Path:
    """One panel per domain: rows = MoE layers, columns = experts, cell = fraction routed."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    domains = list(routing)
    layers = max((len(v) for v in routing.values()), default=1)
    fig, axes = plt.subplots(
        1, len(domains), squeeze=False, layout="constrained",
        figsize=(1.0 + (2.6 + 0.7 * len(names)) * len(domains), 1.6 + 0.45 * layers),
    )  # fmt: skip
    im = None
    for ax, d in zip(axes[0], domains, strict=True):
        rows = routing[d]
        values = [[r["fractions"][n] for n in names] for r in rows]
        labels = [f"L{r['layer']} H={r['entropy']:.2f} V={r['max_vio']:.2f}" for r in rows]
        im = _heatmap(ax, values, labels, names, ".2f", "viridis", (0.0, 1.0))
        ax.set_title(d)
    if im is not None:
        fig.colorbar(im, ax=axes[0].tolist(), label="fraction of assignments")
    fig.suptitle(title)
    try:
        return _save(fig, path)
    finally:
        plt.close(fig)
