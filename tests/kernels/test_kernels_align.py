"""Grouping of (token, k) pairs into per-expert blocks: torch version, one-launch Triton kernel."""

from __future__ import annotations

import pytest
import torch

from serve.kernels.align import ExpertBlocks, align_by_expert, padded_length
from serve.kernels.triton_align import align_triton, fits

CASES = [
    (1, 8, 2, 16),
    (37, 8, 2, 16),
    (70, 4, 4, 16),
    (13, 64, 8, 32),
    (5, 3, 3, 4),
    (9, 6, 6, 16),
]


def _ids(tokens: int, experts: int, top_k: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(tokens + experts)
    return torch.rand(tokens, experts, generator=gen).argsort(dim=1)[:, :top_k].int()


def _check_blocks(blocks: ExpertBlocks, ids: torch.Tensor, experts: int, block_m: int) -> None:
    num_pairs = ids.numel()
    length = padded_length(num_pairs, experts, block_m)
    assert blocks.sorted_ids.shape == (length,) and length % block_m == 0
    assert blocks.block_expert.shape == blocks.block_rows.shape == (length // block_m,)
    flat = ids.reshape(-1).long()
    seen = []
    for b, (expert, rows) in enumerate(
        zip(blocks.block_expert.tolist(), blocks.block_rows.tolist(), strict=True)
    ):
        if expert < 0:
            assert rows == 0
            continue
        assert 1 <= rows <= block_m
        pairs = blocks.sorted_ids[b * block_m : b * block_m + rows].long()
        assert (flat[pairs] == expert).all()
        seen.append(pairs)
    real = torch.cat(seen)
    assert torch.equal(real.sort().values, torch.arange(num_pairs)), "each pair exactly once"
    # Experts in increasing order, each expert's pairs in pair order (stable).
    assert (flat[real][1:] >= flat[real][:-1]).all()
    same = flat[real][1:] == flat[real][:-1]
    assert (real[1:] > real[:-1])[same].all()
    counts = torch.bincount(flat, minlength=experts)
    used = int((blocks.block_rows > 0).sum())
    assert used == int(((counts + block_m - 1) // block_m).sum())
    assert (blocks.block_expert[used:] == -1).all(), "unused blocks come last"


@pytest.mark.parametrize(("tokens", "experts", "top_k", "block_m"), CASES)
def test_torch_blocks(tokens: int, experts: int, top_k: int, block_m: int) -> None:
    ids = _ids(tokens, experts, top_k)
    _check_blocks(align_by_expert(ids, experts, block_m), ids, experts, block_m)


@pytest.mark.parametrize(("tokens", "experts", "top_k", "block_m"), CASES)
def test_triton_blocks_equal_torch(tokens: int, experts: int, top_k: int, block_m: int) -> None:
    ids = _ids(tokens, experts, top_k)
    assert fits(ids.numel(), experts, block_m)
    ref = align_by_expert(ids, experts, block_m)
    # Padding rows may differ (they are unspecified); blocks and real rows must be identical.
    got = align_triton(ids, experts, block_m)
    _check_blocks(got, ids, experts, block_m)
    assert torch.equal(got.block_expert, ref.block_expert)
    assert torch.equal(got.block_rows, ref.block_rows)
    for b, rows in enumerate(ref.block_rows.tolist()):
        span = slice(b * block_m, b * block_m + rows)
        assert torch.equal(got.sorted_ids[span], ref.sorted_ids[span])


def test_skewed_routing() -> None:
    """Every pair on one expert: blocks of that expert only, the others empty."""
    ids = torch.full((40, 2), 3, dtype=torch.int32)
    ids[:, 1] = 5
    for blocks in (align_by_expert(ids, 8, 16), align_triton(ids, 8, 16)):
        _check_blocks(blocks, ids, 8, 16)
        assert blocks.block_expert[:6].tolist() == [3, 3, 3, 5, 5, 5]
        assert blocks.block_rows[:6].tolist() == [16, 16, 8, 16, 16, 8]


def test_fits_limits_the_triton_version() -> None:
    assert fits(16 * 8, 64, 16)  # OLMoE-like decode, 16 tokens
    assert not fits(4096 * 8, 64, 64)  # OLMoE-like prefill: torch version
    with pytest.raises(ValueError, match="too large"):
        align_triton(torch.zeros(4096, 8, dtype=torch.int32), 64, 64)


def test_empty() -> None:
    for blocks in (
        align_by_expert(torch.zeros(0, 2, dtype=torch.int32), 8, 16),
        align_triton(torch.zeros(0, 2, dtype=torch.int32), 8, 16),
    ):
        assert blocks.sorted_ids.numel() == 0 and blocks.block_expert.numel() == 0
