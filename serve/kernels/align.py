"""Group (token, k) pairs by expert into blocks of ``block_m`` rows for the grouped GEMM.

Pure torch, no host synchronisation (so it can be captured in a CUDA graph): the padded length is
the static upper bound ``T*k + min(E, T*k) * (block_m - 1)`` rounded up to ``block_m``; blocks
past the real end get expert -1 and 0 rows, and their programs return at once.
``triton_align`` computes the same blocks in one launch for small problems (decode).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ExpertBlocks:
    """Rows ``b*block_m .. b*block_m + block_rows[b] - 1`` of ``sorted_ids`` hold flat
    (token * top_k + k) pair indices routed to expert ``block_expert[b]``, in pair order; the rest
    of each block is padding whose value is unspecified. Unused blocks: expert -1, 0 rows."""

    sorted_ids: torch.Tensor  # int32 [num_blocks * block_m]
    block_expert: torch.Tensor  # int32 [num_blocks]
    block_rows: torch.Tensor  # int32 [num_blocks]
    num_pairs: int
    block_m: int


def padded_length(num_pairs: int, num_experts: int, block_m: int) -> int:
    """Static upper bound of the number of rows after padding every expert to ``block_m``."""
    bound = num_pairs + min(num_experts, num_pairs) * (block_m - 1)
    return -(-bound // block_m) * block_m


def align_by_expert(topk_ids: torch.Tensor, num_experts: int, block_m: int) -> ExpertBlocks:
    """Sort flat (token, k) pairs by expert (stable, so by pair index within an expert) and pad."""
    flat = topk_ids.reshape(-1).long()
    num_pairs = flat.numel()
    device = flat.device
    length = padded_length(num_pairs, num_experts, block_m)
    # scatter_add, not bincount: CUDA bincount reads the max id back to the host.
    counts = torch.zeros(num_experts, dtype=torch.long, device=device)
    counts.scatter_add_(0, flat, torch.ones_like(flat))
    padded = (counts + block_m - 1) // block_m * block_m
    padded_end = padded.cumsum(0)
    starts = padded_end - padded
    order = torch.argsort(flat, stable=True)
    sorted_experts = flat[order]
    first_of_expert = counts.cumsum(0) - counts
    rank = torch.arange(num_pairs, device=device) - first_of_expert[sorted_experts]
    sorted_ids = torch.empty(length, dtype=torch.int32, device=device)
    sorted_ids[starts[sorted_experts] + rank] = order.to(torch.int32)
    block_start = torch.arange(0, length, block_m, device=device)
    expert = torch.searchsorted(padded_end, block_start, right=True)
    used = expert < num_experts
    safe = expert.clamp(max=num_experts - 1)
    rows = (counts[safe] - (block_start - starts[safe])).clamp(0, block_m)
    block_expert = torch.where(used, expert, -1).to(torch.int32)
    block_rows = torch.where(used, rows, 0).to(torch.int32)
    return ExpertBlocks(sorted_ids, block_expert, block_rows, num_pairs, block_m)
