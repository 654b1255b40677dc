"""Argument checks shared by every backend, run before any kernel launch.

The routing checks need one device-to-host read of the per-row allowed-expert count; that is the
price of raising a clear ``ValueError`` (naming the token row) instead of letting a kernel emit
NaN weights or an arbitrary expert for a row with nothing left to choose from.
"""

from __future__ import annotations

import torch

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_routing_args(
    router_logits: torch.Tensor,
    top_k: int,
    bias: torch.Tensor | None,
    mask: torch.Tensor | None,
    *,
    count_allowed: bool = True,
) -> None:
    """Validate shapes and dtypes, and that every row has at least ``top_k`` allowed experts.

    ``count_allowed=False`` skips the per-row count (the host sync) for callers that have
    already ensured it, e.g. the serving plugin, which counts once per step on the host mask.
    """
    if router_logits.dim() != 2:
        raise ValueError(
            f"router_logits must be [num_tokens, num_experts], got {tuple(router_logits.shape)}"
        )
    if router_logits.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"router_logits must be floating point, got {router_logits.dtype}")
    num_experts = router_logits.shape[1]
    if not 1 <= top_k <= num_experts:
        raise ValueError(f"top_k={top_k} must be between 1 and num_experts={num_experts}")
    if bias is not None:
        if bias.shape != (num_experts,):
            raise ValueError(f"bias must be [{num_experts}], got {tuple(bias.shape)}")
        if bias.dtype not in _FLOAT_DTYPES:
            raise ValueError(f"bias must be floating point, got {bias.dtype}")
        if bias.device != router_logits.device:
            raise ValueError("bias and router_logits must be on the same device")
    if mask is None:
        return
    if mask.shape != router_logits.shape:
        raise ValueError(
            f"mask must have the shape of router_logits {tuple(router_logits.shape)}, "
            f"got {tuple(mask.shape)}"
        )
    if mask.dtype != torch.bool:
        raise ValueError(f"mask must be torch.bool (True = allowed), got {mask.dtype}")
    if mask.device != router_logits.device:
        raise ValueError("mask and router_logits must be on the same device")
    if mask.shape[0] == 0 or not count_allowed:
        return
    allowed = mask.sum(dim=1)
    short = allowed < top_k
    if bool(short.any()):  # the one host sync
        row = int(short.nonzero()[0, 0])
        n = int(allowed[row])
        what = "is fully masked" if n == 0 else f"allows only {n} experts"
        raise ValueError(f"token row {row} {what}, but top_k={top_k} experts must be chosen")


def check_expert_args(
    hidden: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    *,
    check_ids: bool = True,
) -> None:
    """Validate the vLLM fused-MoE layout: w13 [E, 2I, H] (gate rows, up rows), w2 [E, H, I]."""
    if hidden.dim() != 2:
        raise ValueError(f"hidden must be [num_tokens, hidden], got {tuple(hidden.shape)}")
    if w13.dim() != 3 or w2.dim() != 3:
        raise ValueError("w13 must be [E, 2*I, H] and w2 must be [E, H, I]")
    num_tokens, hidden_size = hidden.shape
    num_experts, two_i, h13 = w13.shape
    if two_i % 2 or h13 != hidden_size:
        raise ValueError(f"w13 {tuple(w13.shape)} does not fit hidden size {hidden_size}")
    if w2.shape != (num_experts, hidden_size, two_i // 2):
        raise ValueError(
            f"w2 must be {(num_experts, hidden_size, two_i // 2)}, got {tuple(w2.shape)}"
        )
    if not (hidden.dtype == w13.dtype == w2.dtype):
        raise ValueError(f"dtype mismatch: hidden {hidden.dtype}, w13 {w13.dtype}, w2 {w2.dtype}")
    if topk_ids.dim() != 2 or topk_ids.shape[0] != num_tokens:
        raise ValueError(f"topk_ids must be [{num_tokens}, top_k], got {tuple(topk_ids.shape)}")
    if topk_weights.shape != topk_ids.shape:
        raise ValueError("topk_weights and topk_ids must have the same shape")
    if topk_ids.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"topk_ids must be int32 or int64, got {topk_ids.dtype}")
    if check_ids and topk_ids.numel():
        lo, hi = int(topk_ids.min()), int(topk_ids.max())
        if lo < 0 or hi >= num_experts:
            raise ValueError(f"topk_ids must lie in [0, {num_experts}), got [{lo}, {hi}]")
