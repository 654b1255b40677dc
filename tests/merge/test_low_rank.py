"""Low-rank plus sparse compression."""

from __future__ import annotations

import torch

from merge.low_rank import low_rank_sparse


def test_error_decreases_with_rank_and_full_rank_is_exact() -> None:
    w = torch.randn(48, 32, generator=torch.Generator().manual_seed(0))
    errors = [float((low_rank_sparse(w, r).dense() - w).norm()) for r in (1, 4, 8, 16, 32)]
    assert all(a > b for a, b in zip(errors, errors[1:], strict=False))
    assert errors[-1] < 1e-4 * float(w.norm())


def test_sparse_part_captures_outliers() -> None:
    g = torch.Generator().manual_seed(1)
    low = torch.randn(40, 3, generator=g) @ torch.randn(3, 30, generator=g)
    spikes = torch.zeros(40, 30)
    spikes.view(-1)[torch.randperm(1200, generator=g)[:12]] = 50.0
    w = low + spikes
    plain = float((low_rank_sparse(w, 3).dense() - w).norm())
    with_sparse = low_rank_sparse(w, 3, sparse_density=0.02, iters=10)
    assert float((with_sparse.dense() - w).norm()) < 0.5 * plain
    assert with_sparse.sparse._nnz() == 24
    assert with_sparse.num_stored() < w.numel()
