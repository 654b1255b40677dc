"""The dense merges exactly as main had them before the linear-time selection (b795915):
sort-based TIES trim (``abs().topk(k)``), whole stacked tensors. Kept verbatim as the reference
that the new code must reproduce bit for bit; do not "fix" it.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence

import torch
from torch import Tensor

from merge.errors import MergeError
from merge.task_vectors import (
    Density,
    check_lambda,
    check_tensors,
    densities,
    expert_weights,
)


def task_vectors(base: Tensor, experts: Sequence[Tensor]) -> Tensor:
    """Stacked float32 task vectors, shape [N, *base.shape]."""
    b = base.float()
    return torch.stack([e.float() - b for e in experts])


def combine(base32: Tensor, taus: Tensor, coefs: Tensor) -> Tensor:
    """base + sum_i coefs_i * tau_i, float32.

    ``coefs`` is [N] or broadcastable to ``taus`` ([N, rows, 1, ...] for chunk-wise
    coefficients). Task arithmetic and Expert Merging both go through this one function, so
    Expert Merging frozen at its init reproduces task arithmetic bit for bit.
    """
    if coefs.dim() == 1:
        coefs = coefs.view(-1, *([1] * (taus.dim() - 1)))
    return base32 + (coefs * taus).sum(0)


def task_arithmetic_coefficients(
    n: int, weights: Sequence[float] | None, lambda_: float, normalize: bool, name: str = "tensor"
) -> Tensor:
    """The float32 coefficients c_i = lambda w_i (/ sum w) of task arithmetic."""
    w = expert_weights(weights, n, name)
    check_lambda(lambda_, name)
    if normalize:
        total = sum(w)
        if total == 0:
            raise MergeError(f"tensor {name!r}: parameter 'weight' sums to 0 with normalize")
        w = [x / total for x in w]
    return torch.tensor([lambda_ * x for x in w], dtype=torch.float32)


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
    check_tensors(base, experts, name=name, expert_names=expert_names)
    w = expert_weights(weights, len(experts), name)
    total = sum(w) if normalize else 1.0
    if total == 0:
        raise MergeError(f"tensor {name!r}: parameter 'weight' sums to 0 with normalize")
    out = sum(wi * e.float() for wi, e in zip(w, experts, strict=True)) / total
    dtype = base.dtype if base is not None else experts[0].dtype
    return out.to(dtype)


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
    check_tensors(base, experts, name=name, expert_names=expert_names)
    coefs = task_arithmetic_coefficients(len(experts), weights, lambda_, normalize, name)
    return combine(base.float(), task_vectors(base, experts), coefs).to(base.dtype)


def trim_top_density(tau: Tensor, density: float) -> Tensor:
    """Keep the round(density * n) entries of largest magnitude (at least one), zero the rest."""
    if density >= 1.0:
        return tau.clone()
    flat = tau.reshape(-1)
    k = max(1, round(density * flat.numel()))
    keep = torch.zeros_like(flat, dtype=torch.bool)
    keep[flat.abs().topk(k).indices] = True
    return (flat * keep).reshape(tau.shape)


def disjoint_merge(taus: Tensor, weights: Sequence[float], normalize: bool) -> Tensor:
    """TIES sign election and disjoint merge of (already sparsified) task vectors [N, ...].

    The elected sign of an entry is the sign of sum_i w_i tau_i; only experts whose entry is
    nonzero with that sign contribute. Entries where the weighted sum is exactly 0 elect no sign
    and merge to 0.
    """
    w = torch.tensor(weights, dtype=torch.float32).view(-1, *([1] * (taus.dim() - 1)))
    weighted = w * taus
    elected = torch.sign(weighted.sum(0))
    agree = (torch.sign(taus) == elected) & (taus != 0)
    total = (weighted * agree).sum(0)
    if not normalize:
        return total
    denom = (w * agree).sum(0)
    return torch.where(denom != 0, total / torch.where(denom != 0, denom, 1.0), 0.0)


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
    check_tensors(base, experts, name=name, expert_names=expert_names)
    w = expert_weights(weights, len(experts), name)
    dens = densities(density, len(experts), name)
    check_lambda(lambda_, name)
    taus = task_vectors(base, experts)
    trimmed = torch.stack([trim_top_density(t, d) for t, d in zip(taus, dens, strict=True)])
    merged = disjoint_merge(trimmed, w, normalize)
    return (base.float() + lambda_ * merged).to(base.dtype)


def tensor_generator(seed: int, name: str) -> torch.Generator:
    """A generator seeded from (seed, tensor name): DARE masks then do not depend on the order
    in which a builder visits the tensors."""
    return torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % 2**63)


def dare_sparsify(tau: Tensor, density: float, generator: torch.Generator) -> Tensor:
    """Drop entries with probability 1 - density and rescale the survivors by 1 / density."""
    if density >= 1.0:
        return tau.clone()
    keep = torch.rand(tau.shape, generator=generator) < density
    return tau * keep / density


def _dare_taus(
    base: Tensor, experts: Sequence[Tensor], dens: list[float], gen: torch.Generator
) -> Tensor:
    taus = task_vectors(base, experts)
    return torch.stack([dare_sparsify(t, d, gen) for t, d in zip(taus, dens, strict=True)])


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
    check_tensors(base, experts, name=name, expert_names=expert_names)
    dens = densities(density, len(experts), name)
    coefs = task_arithmetic_coefficients(len(experts), weights, lambda_, normalize, name)
    gen = generator if generator is not None else tensor_generator(seed, name)
    return combine(base.float(), _dare_taus(base, experts, dens, gen), coefs).to(base.dtype)


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
    check_tensors(base, experts, name=name, expert_names=expert_names)
    w = expert_weights(weights, len(experts), name)
    dens = densities(density, len(experts), name)
    check_lambda(lambda_, name)
    gen = generator if generator is not None else tensor_generator(seed, name)
    merged = disjoint_merge(_dare_taus(base, experts, dens, gen), w, normalize)
    return (base.float() + lambda_ * merged).to(base.dtype)
