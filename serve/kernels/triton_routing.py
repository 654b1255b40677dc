"""Triton fused routing: bias, mask, softmax, top-k (ties to the lower index), weights; one launch.

One program handles BLOCK_T token rows with all experts in registers (E is small: 8-128). The
semantics are those of ``reference.route_reference``; the caller has already checked that every
row allows at least top_k experts.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _route_kernel(
    logits_ptr,
    bias_ptr,
    mask_ptr,
    weights_ptr,
    ids_ptr,
    num_tokens,
    num_experts,
    stride_lt,
    stride_mt,
    TOP_K: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_MASK: tl.constexpr,
    SOFTMAX_OVER_CHOSEN: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_E: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.arange(0, BLOCK_E)
    row_ok = rows < num_tokens
    col_ok = cols < num_experts
    in_bounds = row_ok[:, None] & col_ok[None, :]
    x = tl.load(logits_ptr + rows[:, None] * stride_lt + cols[None, :], mask=in_bounds, other=0.0)
    x = x.to(tl.float32)
    if HAS_BIAS:
        x += tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    allowed = col_ok[None, :] & (rows[:, None] >= 0)
    if HAS_MASK:
        # Rows past the end read "allowed" so that they stay finite (they are never stored).
        m = tl.load(mask_ptr + rows[:, None] * stride_mt + cols[None, :], mask=in_bounds, other=1)
        allowed = allowed & (m != 0)
    x = tl.where(allowed, x, float("-inf"))

    # Top-k by repeated arg-max; `free` tracks what can still be chosen, so even an allowed
    # expert whose logit is -inf is chosen before any disallowed one.
    kcols = tl.arange(0, BLOCK_K)
    chosen_x = tl.full((BLOCK_T, BLOCK_K), float("-inf"), tl.float32)
    chosen_id = tl.zeros((BLOCK_T, BLOCK_K), dtype=tl.int32)
    free = allowed
    for i in tl.static_range(TOP_K):
        cand = tl.where(free, x, float("-inf"))
        best = tl.max(cand, axis=1)
        hit = free & (cand == best[:, None])
        idx = tl.min(tl.where(hit, cols[None, :], BLOCK_E), axis=1)
        chosen_x = tl.where(kcols[None, :] == i, best[:, None], chosen_x)
        chosen_id = tl.where(kcols[None, :] == i, idx[:, None], chosen_id)
        free = free & (cols[None, :] != idx[:, None])

    if SOFTMAX_OVER_CHOSEN:  # mixtral: softmax over the k chosen logits
        top = tl.max(chosen_x, axis=1)
        e = tl.exp(chosen_x - top[:, None])
        w = e / tl.sum(e, axis=1)[:, None]
    else:  # flexolmo: softmax over every allowed expert, read at the chosen ones
        top = tl.max(x, axis=1)
        denom = tl.sum(tl.exp(x - top[:, None]), axis=1)
        w = tl.exp(chosen_x - top[:, None]) / denom[:, None]
    out_ok = row_ok[:, None] & (kcols[None, :] < TOP_K)
    offs = rows[:, None] * TOP_K + kcols[None, :]
    tl.store(weights_ptr + offs, w, mask=out_ok)
    tl.store(ids_ptr + offs, chosen_id, mask=out_ok)


def route_triton(
    router_logits: torch.Tensor,
    top_k: int,
    *,
    softmax_over_chosen: bool,
    bias: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    out: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the routing kernel; arguments already checked. Returns (weights fp32, ids int32)."""
    num_tokens, num_experts = router_logits.shape
    device = router_logits.device
    if router_logits.stride(1) != 1:
        router_logits = router_logits.contiguous()
    if out is None:
        weights = torch.empty(num_tokens, top_k, dtype=torch.float32, device=device)
        ids = torch.empty(num_tokens, top_k, dtype=torch.int32, device=device)
    else:
        weights, ids = out
    if num_tokens == 0:
        return weights, ids
    mask_u8 = mask.contiguous().view(torch.uint8) if mask is not None else None
    block_e = triton.next_power_of_2(num_experts)
    block_t = max(1, min(64, 4096 // block_e, triton.next_power_of_2(num_tokens)))
    grid = (triton.cdiv(num_tokens, block_t),)
    _route_kernel[grid](
        router_logits,
        bias.contiguous() if bias is not None else router_logits,
        mask_u8 if mask_u8 is not None else router_logits,
        weights,
        ids,
        num_tokens,
        num_experts,
        router_logits.stride(0),
        num_experts,
        TOP_K=top_k,
        HAS_BIAS=bias is not None,
        HAS_MASK=mask is not None,
        SOFTMAX_OVER_CHOSEN=softmax_over_chosen,
        BLOCK_T=block_t,
        BLOCK_E=block_e,
        BLOCK_K=triton.next_power_of_2(top_k),
    )
    return weights, ids
