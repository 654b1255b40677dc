"""Dense merges over one tensor at a time: linear, task arithmetic, TIES, DARE.

Every function takes the base tensor (or None for ``linear``) and one tensor per expert, all of
the same shape, computes in float32 and returns the base dtype. Parameter names follow mergekit:
``weights`` (one per expert), ``density``, ``lambda_`` (``lambda`` in specs), ``normalize``.

Each method is written once, over row blocks (merge.rows); these functions run it on one
block, the whole tensor, and a streamed build reads blocks of rows of every input from disk.
Blocks give the same bytes as one block: the operations are elementwise, and the sum
over experts adds them in order (what torch's ``sum(0)`` does for up to 4 experts; with more,
torch's own order depends on the tensor's length, see docs/performance.md).

Definitions (tau_i = expert_i - base, the task vector):
- linear:           sum_i w_i x_i / (sum_i w_i if normalize)
- task_arithmetic:  base + sum_i c_i tau_i with c_i = lambda w_i (/ sum_j w_j if normalize)
- ties (Yadav et al. 2023): trim each tau_i to its top-density fraction by magnitude, elect the
  sign of sum_i w_i trim(tau_i) per entry, keep only entries agreeing with it, take their
  (weighted) mean ("disjoint mean", or their sum without normalize) and scale by lambda.
- dare (Yu et al. 2024): drop each entry of tau_i with p = 1 - density and rescale the rest by
  1 / density; ``dare_linear`` then adds like task arithmetic, ``dare_ties`` like TIES (sign
  election and disjoint mean, no magnitude trim).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from merge.rows import Rows, TensorRows, dare_rows, linear_rows, task_arithmetic_rows, ties_rows
from merge.selection import top_magnitude_mask
from merge.task_vectors import Density, check_tensors


def _whole(
    base: Tensor | None,
    experts: Sequence[Tensor],
    name: str,
    expert_names: Sequence[str] | None,
    make: Callable[[TensorRows], Rows],
) -> Tensor:
    check_tensors(base, experts, name=name, expert_names=expert_names)
    src = TensorRows.of(base, experts, name=name, expert_names=expert_names)
    return src.whole(make(src))


def linear(
    base: Tensor | None,
    experts: Sequence[Tensor],
    *,
    weights: Sequence[float] | None = None,
    normalize: bool = True,
    name: str = "tensor",
    expert_names: Sequence[str] | None = None,
) -> Tensor:
    """Weighted average of the experts (``base`` only fixes the output dtype when given)."""
    return _whole(
        base, experts, name, expert_names,
        lambda s: linear_rows(s, weights=weights, normalize=normalize),
    )  # fmt: skip


def task_arithmetic(
    base: Tensor,
    experts: Sequence[Tensor],
    *,
    weights: Sequence[float] | None = None,
    lambda_: float = 1.0,
    normalize: bool = False,
    name: str = "tensor",
    expert_names: Sequence[str] | None = None,
) -> Tensor:
    """base + lambda * sum_i w_i tau_i (Ilharco et al. 2023)."""
    return _whole(
        base, experts, name, expert_names,
        lambda s: task_arithmetic_rows(s, weights=weights, lambda_=lambda_, normalize=normalize),
    )  # fmt: skip


def trim_top_density(tau: Tensor, density: float) -> Tensor:
    """Keep the round(density * n) entries of largest magnitude (at least one), zero the rest
    (ties as torch's topk keeps them; NaN refused; see merge.selection)."""
    if density >= 1.0:
        return tau.clone()
    return tau * top_magnitude_mask(tau, density)


def ties(
    base: Tensor,
    experts: Sequence[Tensor],
    *,
    density: Density,
    weights: Sequence[float] | None = None,
    lambda_: float = 1.0,
    normalize: bool = True,
    name: str = "tensor",
    expert_names: Sequence[str] | None = None,
) -> Tensor:
    """TIES-Merging: trim, elect sign, disjoint mean, scale by lambda."""
    return _whole(
        base, experts, name, expert_names,
        lambda s: ties_rows(
            s, density=density, weights=weights, lambda_=lambda_, normalize=normalize
        ),
    )  # fmt: skip


def dare_sparsify(tau: Tensor, density: float, generator: torch.Generator) -> Tensor:
    """Drop entries with probability 1 - density and rescale the survivors by 1 / density."""
    if density >= 1.0:
        return tau.clone()
    keep = torch.rand(tau.shape, generator=generator) < density
    return tau * keep / density


def dare_linear(
    base: Tensor,
    experts: Sequence[Tensor],
    *,
    density: Density,
    weights: Sequence[float] | None = None,
    lambda_: float = 1.0,
    normalize: bool = False,
    seed: int = 0,
    generator: torch.Generator | None = None,
    name: str = "tensor",
    expert_names: Sequence[str] | None = None,
) -> Tensor:
    """DARE then task arithmetic. Same seed (or generator state) and name, same result."""
    return _whole(
        base, experts, name, expert_names,
        lambda s: dare_rows(
            s, density=density, weights=weights, lambda_=lambda_, normalize=normalize,
            seed=seed, generator=generator,
        ),
    )  # fmt: skip


def dare_ties(
    base: Tensor,
    experts: Sequence[Tensor],
    *,
    density: Density,
    weights: Sequence[float] | None = None,
    lambda_: float = 1.0,
    normalize: bool = True,
    seed: int = 0,
    generator: torch.Generator | None = None,
    name: str = "tensor",
    expert_names: Sequence[str] | None = None,
) -> Tensor:
    """DARE then TIES sign election and disjoint merge (no magnitude trim), scaled by lambda."""
    return _whole(
        base, experts, name, expert_names,
        lambda s: dare_rows(
            s, density=density, weights=weights, lambda_=lambda_, normalize=normalize,
            seed=seed, generator=generator, ties=True,
        ),
    )  # fmt: skip
