"""Dense merges over one tensor at a time: linear, task arithmetic, TIES, DARE.

Every function takes the base tensor (or None for ``linear``) and one tensor per expert, all of
the same shape, computes in float32 and returns the base dtype. Parameter names follow mergekit:
``weights`` (one per expert), ``density``, ``lambda_`` (``lambda`` in specs), ``normalize``.

Each method is written once, over row blocks (``*_rows(TensorRows) -> Rows``): every output
entry depends only on the same entry of the inputs, plus per-tensor facts computed up front
(TIES: which entries each task vector keeps; DARE: where each expert's random stream starts).
A streamed build reads a block of rows of every input from disk, so it never holds a whole
tensor; ``linear(base, experts)`` and the others run the same code on one block, the whole
tensor. Blocks give the same bytes as one block: the operations are elementwise, and the sum
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

import math
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from merge.errors import MergeError
from merge.selection import (
    EXACT_BELOW,
    Selection,
    keep_count,
    sample_windows,
    select_top,
    top_magnitude_mask,
)

Density = float | Sequence[float]


def _who(i: int, expert_names: Sequence[str] | None) -> str:
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
    ref_what = "the base" if base is not None else _who(0, expert_names)
    if base is not None and not base.is_floating_point():
        raise MergeError(f"tensor {name!r}: the base has non-float dtype {base.dtype}")
    for i, t in enumerate(experts):
        if t.shape != ref_shape:
            raise MergeError(
                f"tensor {name!r}: {_who(i, expert_names)} has shape {tuple(t.shape)} but "
                f"{ref_what} has {tuple(ref_shape)}"
            )
        if not t.is_floating_point():
            raise MergeError(
                f"tensor {name!r}: {_who(i, expert_names)} has non-float dtype {t.dtype}"
            )


def _weights(weights: Sequence[float] | None, n: int, name: str) -> list[float]:
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


def _densities(density: Density, n: int, name: str) -> list[float]:
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


def _check_lambda(lambda_: float, name: str) -> None:
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
    w = _weights(weights, n, name)
    _check_lambda(lambda_, name)
    if normalize:
        total = sum(w)
        if total == 0:
            raise MergeError(f"tensor {name!r}: parameter 'weight' sums to 0 with normalize")
        w = [x / total for x in w]
    return torch.tensor([lambda_ * x for x in w], dtype=torch.float32)


# ------------------------------------------------------------------------------------ row blocks

Rows = Callable[[int, int], Tensor]
"""Rows [start, stop) of one tensor along its first dimension (a 0-d tensor has one row)."""


def _rows_of(t: Tensor) -> Rows:
    flat = t.reshape(1) if t.dim() == 0 else t
    return lambda a, b: flat[a:b]


@dataclass(frozen=True)
class TensorRows:
    """One tensor of the base and of every expert, readable in blocks of rows.

    Streamed builds back ``base`` and ``experts`` with positioned reads of the checkpoints;
    ``TensorRows.of`` wraps tensors in memory. ``block_rows`` bounds what a pass over the whole
    tensor (TIES's selection) holds at once; None reads it as one block.
    """

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype  # of the merged rows: the base's (the first expert's without a base)
    base: Rows | None
    experts: tuple[Rows, ...]
    expert_names: tuple[str, ...] | None = None
    block_rows: int | None = None

    @classmethod
    def of(
        cls,
        base: Tensor | None,
        experts: Sequence[Tensor],
        *,
        name: str = "tensor",
        expert_names: Sequence[str] | None = None,
        block_rows: int | None = None,
    ) -> TensorRows:
        ref = base if base is not None else experts[0]
        return cls(
            name=name,
            shape=tuple(ref.shape),
            dtype=ref.dtype,
            base=None if base is None else _rows_of(base),
            experts=tuple(_rows_of(e) for e in experts),
            expert_names=None if expert_names is None else tuple(expert_names),
            block_rows=block_rows,
        )

    @property
    def nrows(self) -> int:
        return self.shape[0] if self.shape else 1

    @property
    def row_elems(self) -> int:
        return math.prod(self.shape[1:]) if self.shape else 1

    @property
    def numel(self) -> int:
        return self.nrows * self.row_elems

    def blocks(self) -> Iterator[tuple[int, int]]:
        step = max(1, self.block_rows or self.nrows)
        for a in range(0, self.nrows, step):
            yield a, min(a + step, self.nrows)

    def whole(self, rows: Rows) -> Tensor:
        """The merged tensor from one block of all rows."""
        return rows(0, self.nrows).reshape(self.shape)

    def _base(self, a: int, b: int) -> Tensor:
        if self.base is None:
            raise MergeError(f"tensor {self.name!r}: this method needs a base model")
        return self.base(a, b)


def linear_rows(
    src: TensorRows, *, weights: Sequence[float] | None = None, normalize: bool = True
) -> Rows:
    """Weighted average of the experts (the base, when given, only fixes the output dtype)."""
    w = _weights(weights, len(src.experts), src.name)
    total = sum(w) if normalize else 1.0
    if total == 0:
        raise MergeError(f"tensor {src.name!r}: parameter 'weight' sums to 0 with normalize")

    def rows(a: int, b: int) -> Tensor:
        out = sum(wi * e(a, b).float() for wi, e in zip(w, src.experts, strict=True)) / total
        return out.to(src.dtype)  # type: ignore[union-attr]

    return rows


def task_arithmetic_rows(
    src: TensorRows,
    *,
    weights: Sequence[float] | None = None,
    lambda_: float = 1.0,
    normalize: bool = False,
) -> Rows:
    """base + lambda * sum_i w_i tau_i (Ilharco et al. 2023)."""
    coefs = task_arithmetic_coefficients(len(src.experts), weights, lambda_, normalize, src.name)

    def rows(a: int, b: int) -> Tensor:
        base = src._base(a, b)
        taus = task_vectors(base, [e(a, b) for e in src.experts])
        return combine(base.float(), taus, coefs).to(src.dtype)

    return rows


def _magnitudes(src: TensorRows, i: int) -> Callable[[], Iterator[Tensor]]:
    def passes() -> Iterator[Tensor]:
        for a, b in src.blocks():
            yield (src.experts[i](a, b).float() - src._base(a, b).float()).abs().reshape(-1)

    return passes


def select_task_vector(src: TensorRows, i: int, density: float) -> Selection:
    """Which entries of expert i's task vector TIES keeps (see merge.selection)."""
    n = src.numel
    sample = None
    if n > EXACT_BELOW:
        sample = torch.cat([
            (src.experts[i](a, b).float() - src._base(a, b).float()).abs().reshape(-1)
            for a, b in sample_windows(src.nrows, src.row_elems)
        ])  # fmt: skip
    what = f"tensor {src.name!r}: the task vector of {_who(i, src.expert_names)}"
    return select_top(_magnitudes(src, i), n, keep_count(n, density), sample, what=what)


def ties_rows(
    src: TensorRows,
    *,
    density: Density,
    weights: Sequence[float] | None = None,
    lambda_: float = 1.0,
    normalize: bool = True,
) -> Rows:
    """TIES-Merging: trim, elect sign, disjoint mean, scale by lambda."""
    w = _weights(weights, len(src.experts), src.name)
    dens = _densities(density, len(src.experts), src.name)
    _check_lambda(lambda_, src.name)
    keep = [
        None if d >= 1.0 or src.numel == 0 else select_task_vector(src, i, d)
        for i, d in enumerate(dens)
    ]
    width = src.row_elems

    def rows(a: int, b: int) -> Tensor:
        base = src._base(a, b)
        taus = task_vectors(base, [e(a, b) for e in src.experts])
        for t, s in zip(taus, keep, strict=True):
            if s is not None:
                t.mul_(s.keep(t.abs(), a * width))  # trim in place: the same t * keep
        merged = disjoint_merge(taus, w, normalize)
        return (base.float() + lambda_ * merged).to(src.dtype)

    return rows


class DareMasks:
    """Every expert's DARE keep-mask, block by block, with the old draws: one generator, the
    experts' n-entry masks one after the other (an expert at density 1 draws nothing).

    The masks of all experts but the last one that drops anything are drawn up front (one bool
    per entry; a generator cannot skip ahead); the last one's are drawn as the blocks come, so
    blocks must be asked for in order, once each. ``gen`` ends where the old code left it.
    """

    def __init__(self, dens: Sequence[float], n: int, gen: torch.Generator, block: int):
        self.dens, self.gen = list(dens), gen
        self.last = max((i for i, d in enumerate(dens) if d < 1.0), default=-1)
        self.drawn: dict[int, Tensor] = {}
        for i, d in enumerate(dens):
            if d < 1.0 and i < self.last:
                mask = torch.empty(n, dtype=torch.bool)
                for a in range(0, n, block):
                    m = min(block, n - a)
                    torch.lt(torch.rand(m, generator=gen), d, out=mask[a : a + m])
                self.drawn[i] = mask

    def keep(self, i: int, start: int, shape: torch.Size) -> Tensor | None:
        """Expert i's mask for the block of ``shape`` at flat ``start`` (None: keeps all)."""
        if self.dens[i] >= 1.0:
            return None
        if i == self.last:
            return torch.rand(shape, generator=self.gen) < self.dens[i]
        return self.drawn[i][start : start + shape.numel()].view(shape)


def dare_rows(
    src: TensorRows,
    *,
    density: Density,
    weights: Sequence[float] | None = None,
    lambda_: float = 1.0,
    normalize: bool = False,
    seed: int = 0,
    generator: torch.Generator | None = None,
    ties: bool = False,
) -> Rows:
    """DARE, then task arithmetic (``ties=False``) or TIES's sign election. Blocks must be asked
    for in order, once each (the masks are drawn as the rows go)."""
    dens = _densities(density, len(src.experts), src.name)
    if ties:
        w = _weights(weights, len(src.experts), src.name)
        _check_lambda(lambda_, src.name)
    else:
        coefs = task_arithmetic_coefficients(
            len(src.experts), weights, lambda_, normalize, src.name
        )
    gen = generator if generator is not None else tensor_generator(seed, src.name)
    block = max(1, (src.block_rows or src.nrows) * src.row_elems)
    masks = DareMasks(dens, src.numel, gen, block)
    width = src.row_elems

    def rows(a: int, b: int) -> Tensor:
        base = src._base(a, b)
        taus = task_vectors(base, [e(a, b) for e in src.experts])
        for i, (t, d) in enumerate(zip(taus, dens, strict=True)):
            m = masks.keep(i, a * width, taus.shape[1:])
            if m is not None:
                t.mul_(m).div_(d)  # in place: the same tau * keep / density
        sparse = taus
        if ties:
            return (base.float() + lambda_ * disjoint_merge(sparse, w, normalize)).to(src.dtype)
        return combine(base.float(), sparse, coefs).to(src.dtype)

    return rows


# ------------------------------------------------------------------------------ whole tensors


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
