"""The maths every dense merge shares: checks of the inputs and parameters, task vectors, the
weighted combination of task arithmetic and TIES's sign election.

merge.rows (streamed row blocks) and merge.expert_merging both build on these, so a method
computes the same numbers whichever way it is run.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Sequence

import torch
from torch import Tensor

from merge.errors import MergeError

Density = float | Sequence[float]


def who(i: int, expert_names: Sequence[str] | None) -> str:
    return f"expert {expert_names[i]!r} (#{i})" if expert_names else f"expert #{i}"


def check_tensors(
    base: Tensor | None,
    experts: Sequence[Tensor],
    *,
    name: str = "tensor",
    expert_names: Sequence[str] | None = None,
) -> None:
    """Raise MergeError unless every expert tensor is floating and shaped like the base."""
    if len(experts) == 0:
        raise MergeError(f"tensor {name!r}: no expert tensors to merge")
    if expert_names is not None and len(expert_names) != len(experts):
        raise MergeError(
            f"tensor {name!r}: {len(expert_names)} expert names for {len(experts)} experts"
        )
    ref_shape = base.shape if base is not None else experts[0].shape
    ref_what = "the base" if base is not None else who(0, expert_names)
    if base is not None and not base.is_floating_point():
        raise MergeError(f"tensor {name!r}: the base has non-float dtype {base.dtype}")
    for i, t in enumerate(experts):
        if t.shape != ref_shape:
            raise MergeError(
                f"tensor {name!r}: {who(i, expert_names)} has shape {tuple(t.shape)} but "
                f"{ref_what} has {tuple(ref_shape)}"
            )
        if not t.is_floating_point():
            raise MergeError(
                f"tensor {name!r}: {who(i, expert_names)} has non-float dtype {t.dtype}"
            )


def expert_weights(weights: Sequence[float] | None, n: int, name: str) -> list[float]:
    if weights is None:
        return [1.0] * n
    if len(weights) != n:
        raise MergeError(
            f"tensor {name!r}: parameter 'weight' has {len(weights)} values for {n} experts"
        )
    for i, w in enumerate(weights):
        if not math.isfinite(w):
            raise MergeError(f"tensor {name!r}: parameter 'weight' of expert #{i} is {w}")
    return [float(w) for w in weights]


def densities(density: Density, n: int, name: str) -> list[float]:
    values = [float(density)] * n if isinstance(density, int | float) else list(density)
    if len(values) != n:
        raise MergeError(
            f"tensor {name!r}: parameter 'density' has {len(values)} values for {n} experts"
        )
    for i, d in enumerate(values):
        if not (0.0 < d <= 1.0):
            raise MergeError(
                f"tensor {name!r}: parameter 'density' of expert #{i} is {d}; it must be in (0, 1]"
            )
    return values


def check_lambda(lambda_: float, name: str) -> None:
    if not math.isfinite(lambda_):
        raise MergeError(f"tensor {name!r}: parameter 'lambda' is {lambda_}")


def task_vectors(base: Tensor, experts: Sequence[Tensor]) -> Tensor:
    """Stacked float32 task vectors, shape [N, *base.shape] (subtracted in place)."""
    b = base.float()
    if b.requires_grad or any(e.requires_grad for e in experts):  # out= has no autograd
        return torch.stack([e.float() - b for e in experts])
    out = torch.empty((len(experts), *b.shape), dtype=torch.float32)
    for i, e in enumerate(experts):
        torch.sub(e.float(), b, out=out[i])
    return out


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


def disjoint_merge(taus: Tensor, weights: Sequence[float], normalize: bool) -> Tensor:
    """TIES sign election and disjoint merge of (already sparsified) task vectors [N, ...].

    The elected sign of an entry is the sign of sum_i w_i tau_i; only experts whose entry is
    nonzero with that sign contribute. Entries where the weighted sum is exactly 0 elect no sign
    and merge to 0.
    """
    w = torch.tensor(weights, dtype=torch.float32).view(-1, *([1] * (taus.dim() - 1)))
    weighted = w * taus
    elected = torch.sign(weighted.sum(0))
    # Nonzero and of the elected sign, i.e. (sign(taus) == elected) & (taus != 0): the product
    # with a sign is exact, and -0, NaN and an unelected (0 or NaN) sign all give False.
    agree = taus * elected > 0
    total = (weighted * agree).sum(0)
    if not normalize:
        return total
    denom = (w * agree).sum(0)
    return torch.where(denom != 0, total / torch.where(denom != 0, denom, 1.0), 0.0)


def tensor_generator(seed: int, name: str) -> torch.Generator:
    """A generator seeded from (seed, tensor name): DARE masks then do not depend on the order
    in which a builder visits the tensors."""
    return torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % 2**63)
