"""Each dense merge method written once, over blocks of rows of one tensor
(``*_rows(TensorRows) -> Rows``), so that a streamed build never holds a whole tensor.

Every output entry depends only on the same entry of the inputs, plus per-tensor facts computed
up front (TIES: which entries each task vector keeps; DARE: where each expert's random stream
starts). merge.dense runs the same functions on one block, the whole tensor; merge.methods lists
them by spec name.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from merge.errors import MergeError
from merge.selection import EXACT_BELOW, Selection, keep_count, sample_windows, select_top
from merge.task_vectors import (
    Density,
    check_lambda,
    combine,
    densities,
    disjoint_merge,
    expert_weights,
    task_arithmetic_coefficients,
    task_vectors,
    tensor_generator,
    who,
)

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
    w = expert_weights(weights, len(src.experts), src.name)
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
    what = f"tensor {src.name!r}: the task vector of {who(i, src.expert_names)}"
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
    w = expert_weights(weights, len(src.experts), src.name)
    dens = densities(density, len(src.experts), src.name)
    check_lambda(lambda_, src.name)
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
    dens = densities(density, len(src.experts), src.name)
    if ties:
        w = expert_weights(weights, len(src.experts), src.name)
        check_lambda(lambda_, src.name)
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


def dare_ties_rows(src: TensorRows, **params: Any) -> Rows:
    """DARE, then TIES's sign election (dare_rows with ``ties=True``)."""
    return dare_rows(src, ties=True, **params)
