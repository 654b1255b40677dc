"""The linear-time top-k by magnitude keeps exactly what the old sort-based rule kept.

The reference is main's ``trim_top_density`` (``abs().topk(k)``), kept verbatim in
reference_dense.py. Ties are where the two could differ: torch's CPU topk keeps the tied entries
that libstdc++'s introselect leaves in front, which is neither the lowest nor the highest index.
"""

from __future__ import annotations

import pytest
import torch

from merge import dense, rows, selection
from merge.errors import MergeError
from tests.merge.reference_dense import trim_top_density as old_trim


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.int32)  # tells +0.0 from -0.0


def old_mask(x: torch.Tensor, density: float) -> torch.Tensor:
    flat = x.reshape(-1)
    k = max(1, round(density * flat.numel()))
    keep = torch.zeros_like(flat, dtype=torch.bool)
    keep[flat.abs().topk(k).indices] = True
    return keep.view(x.shape)


def _adversarial(n: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    signs = torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0)
    return {
        "continuous": torch.randn(n, generator=g),
        "few levels": torch.randint(0, 5, (n,), generator=g).float() * signs,
        "two levels": torch.randint(1, 3, (n,), generator=g).float() * signs,
        "all equal": torch.full((n,), -0.5),
        "zeros": torch.zeros(n),
        "signed zeros": torch.zeros(n) * signs,
        "mostly zero": torch.randn(n, generator=g) * (torch.rand(n, generator=g) < 0.1),
        "quantised": torch.round(torch.randn(n, generator=g) * 64) / 64,
        "with inf": torch.cat([torch.tensor([float("inf"), -float("inf")]), torch.randn(n - 2)]),
    }


DENSITIES = [0.005, 0.01, 0.1, 0.3, 0.5, 0.7, 0.999]


@pytest.mark.parametrize("n", [1, 2, 7, 100, 4097, 70_001])
@pytest.mark.parametrize("density", DENSITIES)
def test_trim_equals_old_rule_on_adversarial_tensors(n: int, density: float) -> None:
    # n = 70_001 goes through the sampled bracket; both topk regimes (64 k <= n uses
    # partial_sort, else nth_element) are covered by the densities.
    for what, x in _adversarial(max(n, 2), seed=n).items():
        x = x[:n]
        new, old = dense.trim_top_density(x, density), old_trim(x, density)
        assert torch.equal(_bits(new), _bits(old)), (what, n, density)
        mask = selection.top_magnitude_mask(x, density)
        k = selection.keep_count(n, density)
        t = old_mask(x, density)
        kth = x.abs()[t].min()
        if kth > 0:  # at a zero threshold the kept zeros may differ; their values cannot
            assert torch.equal(mask, t), (what, n, density)
            assert int(mask.sum()) == k


def test_ties_straddling_the_threshold_keep_topks_choice() -> None:
    # 1000 entries at magnitude 1, keep 300 of them: the choice is topk's, not index order.
    x = torch.ones(1000) * torch.where(torch.arange(1000) % 3 == 0, -1.0, 1.0)
    x[::7] = 2.0
    mask = selection.top_magnitude_mask(x, 0.3)
    assert torch.equal(mask, old_mask(x, 0.3))
    ones = mask & (x.abs() == 1)
    first = torch.zeros_like(ones)
    first[(x.abs() == 1).nonzero()[: int(ones.sum())]] = True
    assert not torch.equal(ones, first)  # neither lowest-index-first ...


def test_density_one_and_one_entry() -> None:
    x = torch.tensor([[-0.0, 3.0], [float("nan"), -1.0]])
    assert torch.equal(_bits(dense.trim_top_density(x, 1.0)), _bits(x))  # no ranking at all
    one = torch.tensor([-2.5])
    assert torch.equal(dense.trim_top_density(one, 0.01), one)  # at least one entry is kept
    assert torch.equal(dense.trim_top_density(torch.tensor(4.0), 0.5), torch.tensor(4.0))


def test_nan_is_refused() -> None:
    x = torch.randn(300_000)
    x[12345] = float("nan")
    with pytest.raises(MergeError, match="NaN"):
        dense.trim_top_density(x, 0.5)
    with pytest.raises(MergeError, match="tensor 'w': the task vector of expert 'b' \\(#1\\)"):
        dense.ties(torch.zeros(3), [torch.ones(3), x[12344:12347]], density=0.5, name="w",
                   expert_names=["a", "b"])  # fmt: skip


@pytest.mark.parametrize("sample", ["none", "all zeros", "all huge", "one value", "good"])
def test_a_bad_sample_costs_time_not_correctness(sample: str) -> None:
    g = torch.Generator().manual_seed(3)
    x = (torch.round(torch.randn(150_000, generator=g) * 32) / 32).abs()
    n, k = x.numel(), selection.keep_count(x.numel(), 0.4)
    samples = {
        "none": None,
        "all zeros": torch.zeros(500),
        "all huge": torch.full((500,), 1e9),
        "one value": x[:1],
        "good": x[::7],
    }
    chunks = list(x.split(4096))
    sel = selection.select_top(lambda: chunks, n, k, samples[sample])
    assert torch.equal(sel.keep(x, 0), old_mask(x, 0.4))


def test_streamed_blocks_equal_the_whole_tensor() -> None:
    # Rows read block by block (as a build reads them from disk) select the same entries.
    g = torch.Generator().manual_seed(5)
    base = torch.round(torch.randn(700, 300, generator=g) * 16) / 16
    expert = base + torch.round(torch.randn(700, 300, generator=g) * 8) / 64
    src = rows.TensorRows.of(base, [expert], name="w", block_rows=64)
    for density in (0.01, 0.5, 0.9):
        sel = rows.select_task_vector(src, 0, density)
        tau = (expert - base).abs()
        assert torch.equal(sel.keep(tau, 0), old_mask(expert - base, density)), density
