"""Routing statistics of an MoE model on calibration tokens, collected with forward hooks.

For every sparse MoE block the hook records the router logits of each token; the activation
frequency of an expert is the share of (token, top-k slot) pairs routed to it, computed with
Mixtral's routing rule (softmax, top-k).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from merge.errors import MergeError

# Router modules: Mixtral/Qwen-MoE style (``mlp.gate``) and the checkpoint naming.
_ROUTER = re.compile(r"(?:^|\.)layers\.(\d+)\.(?:mlp|block_sparse_moe)\.gate$")


@dataclass
class RoutingStats:
    frequency: Tensor  # [E] share of routed token slots per expert; sums to 1
    logits: Tensor  # [T, E] float32 router logits, one row per calibration token
    counts: Tensor  # [E] number of routed token slots per expert


def routing_stats_from_logits(logits: Tensor, top_k: int) -> RoutingStats:
    """Frequencies from router logits [T, E] under softmax + top-k routing."""
    if not 1 <= top_k <= logits.shape[1]:
        raise MergeError(f"top_k {top_k} must be in [1, {logits.shape[1]}]")
    chosen = logits.float().softmax(-1).topk(top_k, dim=-1).indices
    counts = torch.bincount(chosen.reshape(-1), minlength=logits.shape[1]).float()
    return RoutingStats(counts / counts.sum(), logits.float(), counts)


def collect_routing_stats(
    model: nn.Module, batches: Sequence[Tensor], top_k: int | None = None
) -> dict[int, RoutingStats]:
    """Run ``model`` on token-id ``batches`` ([batch, seq], unpadded) and return, per layer
    index, the router logits and expert activation frequencies.

    ``top_k`` defaults to ``model.config.num_experts_per_tok``.
    """
    if top_k is None:
        top_k = int(getattr(getattr(model, "config", None), "num_experts_per_tok", 0) or 0)
        if top_k <= 0:
            raise MergeError("collect_routing_stats: pass top_k (model.config has none)")
    routers = {
        int(m.group(1)): mod for name, mod in model.named_modules() if (m := _ROUTER.search(name))
    }
    if not routers:
        raise MergeError("collect_routing_stats: the model has no '...layers.N.mlp.gate' router")
    seen: dict[int, list[Tensor]] = {i: [] for i in routers}

    def hook(idx: int) -> Callable[[nn.Module, Any, Any], None]:
        def record(_mod: nn.Module, _inp: Any, out: Any) -> None:
            logits = out[0] if isinstance(out, tuple) else out
            seen[idx].append(logits.detach().reshape(-1, logits.shape[-1]).float())

        return record

    handles = [mod.register_forward_hook(hook(i)) for i, mod in routers.items()]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for ids in batches:
                model(input_ids=ids, use_cache=False)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return {i: routing_stats_from_logits(torch.cat(ls), top_k) for i, ls in sorted(seen.items())}
