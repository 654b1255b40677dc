"""Routing per layer and domain: the fraction of token assignments each expert gets, the mean
routing entropy and MaxVio (max load imbalance), with the same router, bias and mask as served.

Computed in transformers, not in the engine: vLLM routes inside its fused-MoE custom op in the
engine-core process, so reading every token's top-k there would need a hook on the serving hot
path and a channel out of that process. transformers with the build's router weights, its
router bias (router_train.biased_router, as training and tuning use it) and the mask added to
the router logits makes the same choices; the perplexity cross-check (tests/eval) ties the two
paths together. Layers listed in ``composer_dense_layers`` get the bias but never the mask, as
in serving, and are not reported: their experts are identical copies of the dense FFN behind a
zero router, so which copy a token reaches says nothing.

- fraction: share of the layer's (token, top-k slot) assignments that went to the expert; a
  masked expert gets none, so fractions sum to 1 over the experts used.
- entropy: mean over tokens of the entropy (nats) of the router's softmax over experts.
- MaxVio: max load / mean load - 1 over the experts the mask allows (0 = perfectly balanced).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from router_train.bias_file import read_router_bias
from router_train.biased_router import attach_router_bias, load_composed


def _routers(model: nn.Module, num_experts: int) -> dict[int, nn.Module]:
    """MoE router per layer index (modules with top_k and one row per expert)."""
    out = {}
    for i, layer in enumerate(model.model.layers):  # type: ignore[union-attr]
        gate = getattr(getattr(layer, "mlp", None), "gate", None)
        if gate is not None and hasattr(gate, "top_k") and gate.weight.shape[0] == num_experts:
            out[i] = gate
    return out


class _Counter:
    """Accumulates one layer's assignments and entropy from its router's outputs."""

    def __init__(self, num_experts: int, counted: torch.Tensor) -> None:
        self.counts = torch.zeros(num_experts, dtype=torch.long)
        self.counted = counted  # bool [E]: experts whose assignments count (the mask)
        self.entropy = 0.0
        self.tokens = 0

    def __call__(self, _module: nn.Module, _args: Any, out: Any) -> None:
        logits, _, top_index = out
        probs = torch.softmax(logits.float(), dim=-1)
        self.entropy += float(torch.special.entr(probs).sum())
        self.tokens += probs.shape[0]
        idx = top_index.reshape(-1)
        idx = idx[self.counted[idx]]  # a masked expert top-k picks with weight 0 is not routed
        self.counts += torch.bincount(idx, minlength=self.counts.numel())

    def summary(self, names: Sequence[str], layer: int) -> dict[str, Any]:
        total = int(self.counts.sum())
        fractions = {
            n: int(c) / total if total else 0.0 for n, c in zip(names, self.counts, strict=True)
        }
        load = self.counts[self.counted].double()
        mean = float(load.sum()) / max(int(self.counted.sum()), 1)
        return {
            "layer": layer,
            "fractions": fractions,
            "entropy": self.entropy / self.tokens if self.tokens else float("nan"),
            "max_vio": float(load.max()) / mean - 1.0 if mean else float("nan"),
        }


def load_masked(
    model_dir: str | Path, names: Sequence[str], allowed: Sequence[str]
) -> tuple[nn.Module, dict[int, nn.Module], torch.Tensor, set[int]]:
    """The build in transformers (float32) routing as served with only ``allowed`` experts:
    (model, router per MoE layer, bool mask [E], layers exempt from the mask)."""
    model = load_composed(model_dir, torch.float32)
    config = json.loads((Path(model_dir) / "config.json").read_text())
    dense = {int(i) for i in config.get("composer_dense_layers") or []}
    keep = torch.tensor([n in allowed for n in names])
    routers = _routers(model, len(names))
    bias = read_router_bias(model_dir)
    mask = torch.where(keep, 0.0, float("-inf"))
    zero = torch.zeros(len(names))
    attach_router_bias(
        model, {i: bias.get(i, zero).float() + (zero if i in dense else mask) for i in routers}
    )
    return model, routers, keep, dense


@torch.no_grad()
def routing_stats(
    model_dir: str | Path,
    chunks: Mapping[str, Sequence[Sequence[int]]],
    names: Sequence[str],
    allowed: Sequence[str],
    batch_size: int = 8,
) -> dict[str, list[dict[str, Any]]]:
    """{domain: [per MoE layer: {"layer", "fractions": {expert: f}, "entropy", "max_vio"}]}."""
    model, routers, keep, dense = load_masked(model_dir, names, allowed)
    out: dict[str, list[dict[str, Any]]] = {}
    for domain, domain_chunks in chunks.items():
        counters = {i: _Counter(len(names), keep) for i in routers if i not in dense}
        hooks = [routers[i].register_forward_hook(c) for i, c in counters.items()]
        try:
            ids = torch.tensor([list(c) for c in domain_chunks], dtype=torch.long)
            for start in range(0, ids.shape[0], batch_size):
                model(input_ids=ids[start : start + batch_size], use_cache=False)
        finally:
            for h in hooks:
                h.remove()
        out[domain] = [c.summary(names, i) for i, c in counters.items()]
    return out
