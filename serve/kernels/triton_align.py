"""One-launch version of ``align.align_by_expert`` for small problems (decode batches).

The torch version costs about twenty small launches, which would dominate a decode step whose
expert GEMMs take tens of microseconds. One program holds every pair and every expert at once:
a one-hot [pairs, experts] matrix gives the per-expert counts (column sums) and each pair's rank
among the earlier pairs of its expert (column prefix sums), hence the same stable order as the
torch version. It is used when both [pairs, experts] and [blocks, experts] fit in ``MAX_TILE``
elements; larger problems use the torch version.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from serve.kernels.align import ExpertBlocks, padded_length

MAX_TILE = 16384  # elements of the one-hot tiles one program holds (8 warps: 64 per thread)


def fits(num_pairs: int, num_experts: int, block_m: int) -> bool:
    e_pad = triton.next_power_of_2(num_experts)
    blocks = padded_length(num_pairs, num_experts, block_m) // block_m
    largest = max(triton.next_power_of_2(num_pairs), triton.next_power_of_2(blocks))
    return largest * e_pad <= MAX_TILE


@triton.jit
def _align_kernel(
    ids_ptr,
    sorted_ids_ptr,
    block_expert_ptr,
    block_rows_ptr,
    num_pairs,
    num_blocks,
    BLOCK_M: tl.constexpr,
    N_PAD: tl.constexpr,
    E_PAD: tl.constexpr,
    B_PAD: tl.constexpr,
):
    pair = tl.arange(0, N_PAD)
    pair_ok = pair < num_pairs
    expert_of = tl.load(ids_ptr + pair, mask=pair_ok, other=-1).to(tl.int32)
    experts = tl.arange(0, E_PAD)
    onehot = (expert_of[:, None] == experts[None, :]).to(tl.int32)  # [N_PAD, E_PAD]
    counts = tl.sum(onehot, axis=0)
    padded = (counts + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    ends = tl.cumsum(padded, axis=0)
    starts = ends - padded
    # 0-based rank of each pair among the pairs of its expert, in pair order (stable).
    rank = tl.sum(onehot * tl.cumsum(onehot, axis=0), axis=1) - 1
    position = tl.sum(onehot * starts[None, :], axis=1) + rank
    tl.store(sorted_ids_ptr + position, pair, mask=pair_ok)

    block = tl.arange(0, B_PAD)
    block_start = block * BLOCK_M
    total = tl.sum(padded, axis=0)
    # Expert e owns rows [starts[e], ends[e]); experts past E have no rows (ends == total).
    owner = tl.sum((ends[None, :] <= block_start[:, None]).to(tl.int32), axis=1)
    is_owner = experts[None, :] == owner[:, None]
    owner_start = tl.sum(tl.where(is_owner, starts[None, :], 0), axis=1)
    owner_count = tl.sum(tl.where(is_owner, counts[None, :], 0), axis=1)
    used = block_start < total
    rows = tl.minimum(tl.maximum(owner_count - (block_start - owner_start), 0), BLOCK_M)
    block_ok = block < num_blocks
    tl.store(block_expert_ptr + block, tl.where(used, owner, -1), mask=block_ok)
    tl.store(block_rows_ptr + block, tl.where(used, rows, 0), mask=block_ok)


def align_triton(topk_ids: torch.Tensor, num_experts: int, block_m: int) -> ExpertBlocks:
    """Same result as ``align_by_expert`` (padding values aside); requires ``fits(...)``."""
    flat = topk_ids.reshape(-1)
    if flat.dtype != torch.int32:
        flat = flat.to(torch.int32)
    flat = flat.contiguous()
    num_pairs = flat.numel()
    if not fits(num_pairs, num_experts, block_m):
        raise ValueError(f"{num_pairs} pairs x {num_experts} experts is too large for one program")
    length = padded_length(num_pairs, num_experts, block_m)
    num_blocks = length // block_m
    device = flat.device
    sorted_ids = torch.empty(length, dtype=torch.int32, device=device)
    block_expert = torch.empty(num_blocks, dtype=torch.int32, device=device)
    block_rows = torch.empty(num_blocks, dtype=torch.int32, device=device)
    if num_pairs:
        _align_kernel[(1,)](
            flat,
            sorted_ids,
            block_expert,
            block_rows,
            num_pairs,
            num_blocks,
            BLOCK_M=block_m,
            N_PAD=triton.next_power_of_2(num_pairs),
            E_PAD=triton.next_power_of_2(num_experts),
            B_PAD=triton.next_power_of_2(num_blocks),
            num_warps=8,
        )
    return ExpertBlocks(sorted_ids, block_expert, block_rows, num_pairs, block_m)
