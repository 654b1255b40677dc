"""Torch reference of masked MoE routing and of the grouped SwiGLU experts.

This is what the serving plugin runs on CPU and what the Triton kernels are tested against. It
defines the semantics; the kernels must reproduce it:

Routing (``route_reference``), per token row, in ``compute_dtype`` (float32 unless asked):
  1. ``x = logits + bias`` (bias optional, per expert).
  2. Disallowed experts (``mask`` False) are removed: ``x -> -inf``, and they are never chosen.
  3. The ``top_k`` experts with the largest ``x`` are chosen, in descending order; equal values
     are ordered by the lower expert index first. Selection uses ``x`` itself, not the softmax of
     it, so rounding in ``exp`` can never reorder or tie two experts.
  4. ``flexolmo``: weights are the softmax over all *allowed* experts, read at the chosen ones
     (no renormalisation). ``mixtral``: weights are the softmax over the chosen ``x`` only.
Because a masked expert contributes exactly nothing, masking expert j gives the routing of the
same logits with column j deleted (ids above j shifted down by one).

Experts (``fused_experts_reference``), vLLM fused-MoE layout: ``w13 [E, 2I, H]`` holds the gate
rows then the up rows, ``w2 [E, H, I]``; ``out[t] = sum_k w[t,k] * W2_e (silu(G_e x) * (U_e x))``
with ``e = ids[t,k]``. By default the arithmetic is the kernel's: products accumulated in
float32, SiLU-and-multiply in float32, the activation rounded once to the input dtype (the
second GEMM's operand), the k contributions summed in float32 in k order, the result rounded to
the input dtype. ``compute_dtype=torch.float64`` gives the exact-maths reference instead (no
intermediate rounding, float64 result).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

from serve.kernels.checks import check_expert_args, check_routing_args

Variant = Literal["flexolmo", "mixtral"]


def route_reference(
    router_logits: torch.Tensor,
    top_k: int,
    *,
    variant: Variant,
    bias: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    compute_dtype: torch.dtype = torch.float32,
    check_mask: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(topk_weights [T, k] in compute_dtype, topk_ids [T, k] int32)``."""
    if variant not in ("flexolmo", "mixtral"):
        raise ValueError(f"unknown routing variant {variant!r}")
    check_routing_args(router_logits, top_k, bias, mask, count_allowed=check_mask)
    x = router_logits.to(compute_dtype)
    if bias is not None:
        x = x + bias.to(compute_dtype)
    if mask is not None:
        x = x.masked_fill(~mask, float("-inf"))
    ids = _top_k_lowest_index(x, mask, top_k)
    if variant == "flexolmo":
        weights = torch.softmax(x, dim=1).gather(1, ids)
    else:
        weights = torch.softmax(x.gather(1, ids), dim=1)
    return weights, ids.to(torch.int32)


def _top_k_lowest_index(x: torch.Tensor, mask: torch.Tensor | None, top_k: int) -> torch.Tensor:
    """Indices of the top_k allowed values, descending, ties to the lower index.

    torch.topk leaves the order of equal values unspecified, so this sorts stably instead: a
    stable descending sort keeps equal values in index order; a second stable sort on the mask
    puts allowed experts before disallowed ones even when an allowed logit is itself -inf.
    """
    order = torch.sort(x, dim=1, descending=True, stable=True).indices
    if mask is not None:
        allowed_in_order = mask.gather(1, order).to(torch.int8)
        order = order.gather(
            1, torch.sort(allowed_in_order, dim=1, descending=True, stable=True).indices
        )
    return order[:, :top_k]


def fused_experts_reference(
    hidden: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    *,
    compute_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Grouped SwiGLU experts; ``[T, H]`` in hidden's dtype (or ``compute_dtype`` if given)."""
    check_expert_args(hidden, w13, w2, topk_weights, topk_ids)
    exact = compute_dtype is not None
    acc_dtype = compute_dtype if exact else torch.float32
    num_tokens, hidden_size = hidden.shape
    top_k = topk_ids.shape[1]
    inter = w2.shape[2]
    flat_ids = topk_ids.reshape(-1).long()
    flat_tokens = torch.arange(num_tokens, device=hidden.device).repeat_interleave(top_k)
    flat_weights = topk_weights.reshape(-1).to(acc_dtype)
    # One row per (token, k) pair, summed over k afterwards: the kernel's order of additions.
    rows = torch.zeros(num_tokens * top_k, hidden_size, dtype=acc_dtype, device=hidden.device)
    for expert in flat_ids.unique().tolist():
        sel = (flat_ids == expert).nonzero().squeeze(1)
        x = hidden[flat_tokens[sel]].to(acc_dtype)
        gate_up = x @ w13[expert].to(acc_dtype).T
        act = F.silu(gate_up[:, :inter]) * gate_up[:, inter:]
        if not exact:
            act = act.to(hidden.dtype).to(acc_dtype)
        rows[sel] = (act @ w2[expert].to(acc_dtype).T) * flat_weights[sel, None]
    out = rows.view(num_tokens, top_k, hidden_size).sum(dim=1)
    return out if exact else out.to(hidden.dtype)
