"""Triton grouped-GEMM SwiGLU experts (vLLM fused-MoE weight layout).

Pipeline: ``align_by_expert`` (one launch of ``triton_align`` for small problems) sorts the
(token, k) pairs by expert into blocks of BLOCK_M rows;
``_gate_up_kernel`` runs one program per (row block, tile of BLOCK_N intermediate columns) and
computes the gate and up products of that tile together, applying SiLU-and-multiply on the float32
accumulators before a single store of the activation; ``_down_kernel`` runs one program per (row
block, tile of hidden columns), scales each row by its routing weight and stores it to a float32
row per (token, k) pair; ``_sum_k_kernel`` then sums the k rows of each token in k order and
rounds once. Every pair row is written exactly once, so no atomics are needed and the result is
deterministic.

Interpreter note: triton 3.9's interpreter computes ``tl.dot`` on bfloat16 operands as integer
matmuls of their raw uint16 bits (wrong by orders of magnitude; fp16 and fp32 are right), so when
interpreting bf16 the operands are widened to float32 first. That is the same arithmetic as a
bf16 tensor-core dot with float32 accumulation: a product of two bf16 values is exact in float32.
Float32 inputs use ``input_precision="ieee"`` (Triton's default on GPU would be TF32).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Literal

import torch
import triton
import triton.language as tl

from serve.kernels import triton_align
from serve.kernels.align import ExpertBlocks, align_by_expert

_TL_DTYPES = {torch.float16, torch.bfloat16, torch.float32}


@dataclass(frozen=True)
class ExpertConfig:
    """Tile sizes and launch options. BLOCK_M is shared (it fixes the alignment); each GEMM has
    its own BLOCK_N because the gate/up program holds two accumulators."""

    block_m: int
    block_n_gate_up: int
    block_n_down: int
    block_k: int
    group_m: int = 1
    num_warps: int = 4
    num_stages: int = 2


def interpreting() -> bool:
    """Whether @triton.jit kernels run in the interpreter (triton.knobs is new in triton 3.3)."""
    knobs = getattr(triton, "knobs", None)
    if knobs is not None:
        return bool(knobs.runtime.interpret)
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def pick_config(
    num_pairs: int, num_experts: int, dtype: torch.dtype, *, interpret: bool | None = None
) -> ExpertConfig:
    """Heuristic tiles: small under the interpreter; on GPU by rows per expert.

    Not timed on a GPU yet (none was available). ``compile_check`` verifies for sm_90a that
    every choice compiles with pipelined loads, no register spills and shared memory in bounds.
    """
    if interpreting() if interpret is None else interpret:
        return ExpertConfig(block_m=16, block_n_gate_up=32, block_n_down=32, block_k=32)
    rows_per_expert = num_pairs / num_experts
    if dtype == torch.float32:  # tests and debugging: CUDA-core FMAs, small tiles, no spills
        block_m = 16 if rows_per_expert <= 16 else 32
        return ExpertConfig(block_m, 32, 32, 32, group_m=4, num_warps=4, num_stages=2)
    if rows_per_expert <= 16:  # decode: bandwidth bound, mma.sync on 16-row tiles
        return ExpertConfig(16, 64, 32, 128, group_m=1, num_warps=4, num_stages=4)
    if rows_per_expert <= 128:  # 64-row tiles: Hopper warp-group MMA
        return ExpertConfig(64, 64, 64, 64, group_m=4, num_warps=4, num_stages=3)
    return ExpertConfig(128, 64, 128, 64, group_m=8, num_warps=8, num_stages=3)


@triton.jit
def _tile_ids(pid, num_pid_m, num_pid_n, GROUP_M: tl.constexpr):
    # Consecutive programs walk GROUP_M row blocks for one column tile: weight tiles stay in L2.
    in_group = GROUP_M * num_pid_n
    first_m = (pid // in_group) * GROUP_M
    group_size = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % in_group) % group_size
    pid_n = (pid % in_group) // group_size
    return pid_m, pid_n


@triton.jit
def _gate_up_kernel(
    x_ptr,
    w13_ptr,
    act_ptr,
    sorted_ids_ptr,
    block_expert_ptr,
    block_rows_ptr,
    top_k,
    hidden_size,
    inter_size,
    num_pid_m,
    stride_xt,
    stride_we,
    stride_wn,
    stride_at,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    UPCAST: tl.constexpr,
    IEEE: tl.constexpr,
):
    num_pid_n = tl.cdiv(inter_size, BLOCK_N)
    pid_m, pid_n = _tile_ids(tl.program_id(0), num_pid_m, num_pid_n, GROUP_M)
    n_rows = tl.load(block_rows_ptr + pid_m)
    if n_rows == 0:  # a padding block past the last expert's rows
        return
    expert = tl.load(block_expert_ptr + pid_m).to(tl.int64)
    row_ok = tl.arange(0, BLOCK_M) < n_rows
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    pair = tl.load(sorted_ids_ptr + rows, mask=row_ok, other=0).to(tl.int64)
    token = pair // top_k
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < inter_size
    ks = tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + token[:, None] * stride_xt + ks[None, :]
    # [BLOCK_K, BLOCK_N] views of the gate rows and of the up rows (I rows further down).
    g_ptrs = w13_ptr + expert * stride_we + cols[None, :] * stride_wn + ks[:, None]
    u_ptrs = g_ptrs + inter_size * stride_wn
    acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, hidden_size, BLOCK_K):
        k_ok = ks < hidden_size - k0
        x = tl.load(x_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        g = tl.load(g_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        u = tl.load(u_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        if UPCAST:
            x = x.to(tl.float32)
            g = g.to(tl.float32)
            u = u.to(tl.float32)
        if IEEE:
            acc_g = tl.dot(x, g, acc_g, input_precision="ieee")
            acc_u = tl.dot(x, u, acc_u, input_precision="ieee")
        else:
            acc_g = tl.dot(x, g, acc_g)
            acc_u = tl.dot(x, u, acc_u)
        x_ptrs += BLOCK_K
        g_ptrs += BLOCK_K
        u_ptrs += BLOCK_K
    act = acc_g * tl.sigmoid(acc_g) * acc_u
    a_ptrs = act_ptr + pair[:, None] * stride_at + cols[None, :]
    tl.store(a_ptrs, act.to(act_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _down_kernel(
    act_ptr,
    w2_ptr,
    weights_ptr,
    rows_ptr,
    sorted_ids_ptr,
    block_expert_ptr,
    block_rows_ptr,
    hidden_size,
    inter_size,
    num_pid_m,
    stride_at,
    stride_we,
    stride_wn,
    stride_rt,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    UPCAST: tl.constexpr,
    IEEE: tl.constexpr,
):
    num_pid_n = tl.cdiv(hidden_size, BLOCK_N)
    pid_m, pid_n = _tile_ids(tl.program_id(0), num_pid_m, num_pid_n, GROUP_M)
    n_rows = tl.load(block_rows_ptr + pid_m)
    if n_rows == 0:  # a padding block past the last expert's rows
        return
    expert = tl.load(block_expert_ptr + pid_m).to(tl.int64)
    row_ok = tl.arange(0, BLOCK_M) < n_rows
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    pair = tl.load(sorted_ids_ptr + rows, mask=row_ok, other=0).to(tl.int64)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < hidden_size
    ks = tl.arange(0, BLOCK_K)
    a_ptrs = act_ptr + pair[:, None] * stride_at + ks[None, :]
    w_ptrs = w2_ptr + expert * stride_we + cols[None, :] * stride_wn + ks[:, None]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, inter_size, BLOCK_K):
        k_ok = ks < inter_size - k0
        a = tl.load(a_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        if UPCAST:
            a = a.to(tl.float32)
            w = w.to(tl.float32)
        if IEEE:  # noqa: SIM108 (a static branch reads plainer in Triton than a ternary)
            acc = tl.dot(a, w, acc, input_precision="ieee")
        else:
            acc = tl.dot(a, w, acc)
        a_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    scale = tl.load(weights_ptr + pair, mask=row_ok, other=0.0).to(tl.float32)
    acc = acc * scale[:, None]
    r_ptrs = rows_ptr + pair[:, None] * stride_rt + cols[None, :]
    tl.store(r_ptrs, acc, mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _sum_k_kernel(rows_ptr, out_ptr, hidden_size, TOP_K: tl.constexpr, BLOCK_H: tl.constexpr):
    # out[t] = rows[t*k] + ... + rows[t*k + k-1] in float32, in k order, rounded once.
    token = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    ok = cols < hidden_size
    acc = tl.zeros((BLOCK_H,), dtype=tl.float32)
    for k in tl.static_range(TOP_K):
        acc += tl.load(rows_ptr + (token * TOP_K + k) * hidden_size + cols, mask=ok, other=0.0)
    tl.store(out_ptr + token * hidden_size + cols, acc.to(out_ptr.dtype.element_ty), mask=ok)


def sum_k(rows_out: torch.Tensor, top_k: int, out: torch.Tensor) -> None:
    """out[t] = sum over k of rows_out[t*top_k + k] (float32 sum, one rounding to out's dtype)."""
    num_tokens, hidden_size = out.shape
    block_h = min(1024, triton.next_power_of_2(hidden_size))
    grid = (num_tokens, triton.cdiv(hidden_size, block_h))
    _sum_k_kernel[grid](rows_out, out, hidden_size, TOP_K=top_k, BLOCK_H=block_h)


def _grid(blocks: ExpertBlocks, n: int, block_n: int) -> tuple[int]:
    return (blocks.block_expert.numel() * triton.cdiv(n, block_n),)


def gate_up(
    hidden: torch.Tensor,
    w13: torch.Tensor,
    blocks: ExpertBlocks,
    top_k: int,
    act_out: torch.Tensor,
    config: ExpertConfig,
) -> None:
    """act_out[pair] = silu(G_e x) * (U_e x) for every routed (token, k) pair (act_out's dtype)."""
    inter = w13.shape[1] // 2
    upcast = interpreting() and hidden.dtype == torch.bfloat16
    _gate_up_kernel[_grid(blocks, inter, config.block_n_gate_up)](
        hidden,
        w13,
        act_out,
        blocks.sorted_ids,
        blocks.block_expert,
        blocks.block_rows,
        top_k,
        hidden.shape[1],
        inter,
        blocks.block_expert.numel(),
        hidden.stride(0),
        w13.stride(0),
        w13.stride(1),
        act_out.stride(0),
        BLOCK_M=config.block_m,
        BLOCK_N=config.block_n_gate_up,
        BLOCK_K=config.block_k,
        GROUP_M=config.group_m,
        UPCAST=upcast,
        IEEE=hidden.dtype == torch.float32,
        num_warps=config.num_warps,
        num_stages=config.num_stages,
    )


def down(
    act: torch.Tensor,
    w2: torch.Tensor,
    flat_weights: torch.Tensor,
    blocks: ExpertBlocks,
    rows_out: torch.Tensor,
    config: ExpertConfig,
) -> None:
    """rows_out[pair] = weight[pair] * (W2_e act[pair]) in float32, for every routed pair."""
    hidden_size, inter = w2.shape[1], w2.shape[2]
    upcast = interpreting() and act.dtype == torch.bfloat16
    _down_kernel[_grid(blocks, hidden_size, config.block_n_down)](
        act,
        w2,
        flat_weights,
        rows_out,
        blocks.sorted_ids,
        blocks.block_expert,
        blocks.block_rows,
        hidden_size,
        inter,
        blocks.block_expert.numel(),
        act.stride(0),
        w2.stride(0),
        w2.stride(1),
        rows_out.stride(0),
        BLOCK_M=config.block_m,
        BLOCK_N=config.block_n_down,
        BLOCK_K=config.block_k,
        GROUP_M=config.group_m,
        UPCAST=upcast,
        IEEE=act.dtype == torch.float32,
        num_warps=config.num_warps,
        num_stages=config.num_stages,
    )


def fused_experts_triton(
    hidden: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    *,
    config: ExpertConfig | None = None,
    act_out: torch.Tensor | None = None,
    rows_out: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    align: Literal["auto", "torch", "triton"] = "auto",
) -> torch.Tensor:
    """Grouped SwiGLU experts; arguments as ``fused_experts_reference`` (checked by the caller).

    ``act_out [T*k, I]`` (input dtype), ``rows_out [T*k, H]`` (float32) and ``out [T, H]`` may be
    passed in (workspace reuse, or NaN-poisoned buffers in tests); they are allocated otherwise.
    ``align="auto"`` groups the pairs with the one-launch Triton kernel when they fit in one
    program (``triton_align.fits``), with torch otherwise.
    """
    if hidden.dtype not in _TL_DTYPES:
        raise ValueError(f"the Triton experts support fp16, bf16 and fp32, not {hidden.dtype}")
    hidden, w13, w2 = hidden.contiguous(), w13.contiguous(), w2.contiguous()
    num_tokens, hidden_size = hidden.shape
    num_experts, inter = w13.shape[0], w13.shape[1] // 2
    top_k = topk_ids.shape[1]
    num_pairs = num_tokens * top_k
    if out is None:
        out = torch.empty_like(hidden)
    if num_pairs == 0:
        return out
    config = config or pick_config(num_pairs, num_experts, hidden.dtype)
    small = triton_align.fits(num_pairs, num_experts, config.block_m)
    if align == "triton" or (align == "auto" and small):
        blocks = triton_align.align_triton(topk_ids, num_experts, config.block_m)
    else:
        blocks = align_by_expert(topk_ids, num_experts, config.block_m)
    if act_out is None:
        act_out = torch.empty(num_pairs, inter, dtype=hidden.dtype, device=hidden.device)
    if rows_out is None:
        rows_out = torch.empty(num_pairs, hidden_size, dtype=torch.float32, device=hidden.device)
    if not (act_out.is_contiguous() and rows_out.is_contiguous() and out.is_contiguous()):
        raise ValueError("act_out, rows_out and out must be contiguous")
    flat_weights = topk_weights.reshape(-1).to(torch.float32).contiguous()
    gate_up(hidden, w13, blocks, top_k, act_out, config)
    down(act_out, w2, flat_weights, blocks, rows_out, config)
    sum_k(rows_out, top_k, out)
    return out
