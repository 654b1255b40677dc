"""Neuron permutation: Hungarian matching against brute force, function preservation."""

from __future__ import annotations

import itertools

import pytest
import torch

from merge.moe_layer import expert_forward
from merge.permutation import align_neurons, max_weight_matching, permute_expert


@pytest.mark.parametrize("seed", range(5))
def test_matching_equals_brute_force(seed: int) -> None:
    sim = torch.randn(6, 6, generator=torch.Generator().manual_seed(seed))
    perm = max_weight_matching(sim)
    best = max(itertools.permutations(range(6)), key=lambda p: float(sim[range(6), list(p)].sum()))
    assert sorted(perm.tolist()) == list(range(6))
    assert float(sim[range(6), perm].sum()) == pytest.approx(
        float(sim[range(6), list(best)].sum()), abs=1e-9
    )


def _expert(seed: int, i: int = 96, h: int = 32) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(s, generator=g) / 8 for s in ((i, h), (i, h), (h, i)))


def test_permuted_expert_computes_the_same_function() -> None:
    w1, w3, w2 = _expert(0)
    perm = torch.randperm(96, generator=torch.Generator().manual_seed(1))
    x = torch.randn(50, 32, generator=torch.Generator().manual_seed(2))
    y = expert_forward(w1, w3, w2, x)
    y_perm = expert_forward(*permute_expert(w1, w3, w2, perm), x)
    assert not torch.equal(permute_expert(w1, w3, w2, perm)[0], w1)
    torch.testing.assert_close(y_perm, y, rtol=1e-5, atol=1e-6)


def test_alignment_recovers_a_hidden_permutation() -> None:
    ref = _expert(3)
    perm = torch.randperm(96, generator=torch.Generator().manual_seed(4))
    shuffled = permute_expert(*ref, perm)
    # A little noise, as between two experts fine-tuned from one FFN.
    noisy = tuple(t + 0.01 * torch.randn_like(t) for t in shuffled)
    aligned = permute_expert(*noisy, align_neurons(ref, noisy))
    for a, r in zip(aligned, ref, strict=True):
        assert (a - r).abs().max() < 0.1
    assert align_neurons(ref, ref).tolist() == list(range(96))
