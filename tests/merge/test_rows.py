"""Merging in blocks of rows gives the bytes main's whole-tensor code gave (reference_dense.py).

Builds read big tensors in blocks (a multiple of 64 rows) and small ones whole; both must equal
the old functions bit for bit, signed zeros included, for every method, dtype and expert count.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch

from merge import dense, rows
from merge.state_dict import merge_rows
from tests.merge import reference_dense as old


def _bits(t: torch.Tensor) -> torch.Tensor:
    t = t.contiguous()
    return t.view(torch.int32) if t.dtype == torch.float32 else t.view(torch.int16)


def _inputs(shape: tuple[int, ...], n: int, dtype: torch.dtype, seed: int) -> tuple[Any, Any]:
    """Quantised values, so task vectors have ties, exact zeros and signed zeros."""
    g = torch.Generator().manual_seed(seed)
    base = torch.round(torch.randn(shape, generator=g) * 8) / 8
    experts = []
    for _ in range(n):
        delta = torch.round(torch.randn(shape, generator=g) * 4) / 32
        delta = delta * (torch.rand(shape, generator=g) < 0.8)  # some entries equal the base
        experts.append((base + delta).to(dtype))
    return base.to(dtype), experts


# method -> (params, old function on whole tensors)
CASES: dict[str, tuple[dict[str, Any], Callable[..., torch.Tensor]]] = {
    "linear": ({"normalize": True}, lambda b, e, p: old.linear(b, e, weights=p["weight"])),
    "linear_sum": (
        {"normalize": False},
        lambda b, e, p: old.linear(b, e, weights=p["weight"], normalize=False),
    ),
    "task_arithmetic": (
        {"lambda": 0.7},
        lambda b, e, p: old.task_arithmetic(b, e, weights=p["weight"], lambda_=0.7),
    ),
    "ties": (
        {"density": 0.3, "lambda": 0.9},
        lambda b, e, p: old.ties(b, e, density=0.3, weights=p["weight"], lambda_=0.9),
    ),
    "ties_unnormalised": (
        {"density": 0.6, "normalize": False},
        lambda b, e, p: old.ties(b, e, density=0.6, weights=p["weight"], normalize=False),
    ),
    "dare_linear": (
        {"density": 0.4, "seed": 3},
        lambda b, e, p: old.dare_linear(b, e, density=0.4, weights=p["weight"], seed=3, name="w"),
    ),
    "dare_ties": (
        {"density": 0.4, "seed": 3},
        lambda b, e, p: old.dare_ties(b, e, density=0.4, weights=p["weight"], seed=3, name="w"),
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("n", [1, 3, 4, 6])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_blocks_and_whole_equal_the_old_code(case: str, n: int, dtype: torch.dtype) -> None:
    extra, reference = CASES[case]
    method = case.removesuffix("_sum").removesuffix("_unnormalised")
    for shape in [(), (5,), (300,), (200, 33), (130, 4, 3)]:
        base, experts = _inputs(shape, n, dtype, seed=n * 7 + len(shape))
        params = {"weight": [0.5 + i for i in range(n)], **extra}
        want = reference(base, experts, params)
        src = rows.TensorRows.of(base, experts, name="w", block_rows=64)
        merged = merge_rows(method, src, params)
        blocks = torch.cat([merged(a, b) for a, b in src.blocks()]).reshape(shape)
        whole = src.whole(merge_rows(method, rows.TensorRows.of(base, experts, name="w"), params))
        assert blocks.dtype == want.dtype == dtype
        assert torch.equal(_bits(blocks), _bits(want)), (case, n, shape)
        assert torch.equal(_bits(whole), _bits(want)), (case, n, shape)


def test_dare_with_a_caller_generator_leaves_it_where_the_old_code_did() -> None:
    base, experts = _inputs((70, 9), 3, torch.float32, seed=1)
    g_old, g_new = torch.Generator().manual_seed(11), torch.Generator().manual_seed(11)
    want = old.dare_ties(base, experts, density=[0.3, 1.0, 0.5], generator=g_old)
    got = dense.dare_ties(base, experts, density=[0.3, 1.0, 0.5], generator=g_new)
    assert torch.equal(got, want)
    assert torch.equal(g_new.get_state(), g_old.get_state())


def test_dare_masks_are_the_old_draws_in_any_blocks() -> None:
    # The old code drew expert after expert from one generator (density 1: no draws).
    one = torch.Generator().manual_seed(4)
    first, third = torch.rand(10, generator=one) < 0.5, torch.rand(10, generator=one) < 0.2
    gen = torch.Generator().manual_seed(4)
    masks = rows.DareMasks([0.5, 1.0, 0.2], 10, gen, block=3)
    assert masks.keep(1, 0, torch.Size([4])) is None
    got0 = torch.cat([masks.keep(0, a, torch.Size([min(4, 10 - a)])) for a in (0, 4, 8)])
    got2 = torch.cat([masks.keep(2, a, torch.Size([min(4, 10 - a)])) for a in (0, 4, 8)])
    assert torch.equal(got0, first) and torch.equal(got2, third)
    assert torch.equal(gen.get_state(), one.get_state())
