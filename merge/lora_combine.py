"""Several LoRA adapters into one adapter, with PEFT's ``add_weighted_adapter`` combinations.

The output of a ``merge`` build with ``output.format: lora`` stays an adapter (small, servable
next to others on one base) instead of a dense model. Each function here works on one adapted
weight: the input adapters' factors (merge.lora.LoraFactor; None where an adapter leaves the
weight alone, which PEFT skips) in, the merged adapter's (A [r, in], B [out, r]) out, with the
scale folded in (the output adapter has lora_alpha = r: scale 1, as PEFT writes it).

Combinations, PEFT's names and meanings (w_i the weights, s_i the adapters' scales alpha/r):
- ``linear``: A = sum_i sign(w_i) sqrt|w_i s_i| A_i, B = sum_i sqrt|w_i s_i| B_i (equal ranks).
  Not the weighted sum of the deltas: B A has the cross terms B_i A_j (PEFT: "a very rough
  approximation").
- ``cat``: A = [w_1 s_1 A_1; w_2 s_2 A_2; ...], B = [B_1, B_2, ...]: B A = sum_i w_i s_i B_i A_i
  exactly, rank sum_i r_i (zero-padded where an adapter does not touch the weight).
- ``svd``: the best rank-``rank`` approximation (truncated SVD) of sum_i w_i delta_i.
- ``ties`` / ``dare_linear`` / ``dare_ties``: PEFT applies TIES / DARE to the A factors and to
  the B factors separately (weights sqrt|w_i s_i| as in ``linear``), not to the deltas.
- ``ties_svd`` / ``dare_linear_svd`` / ``dare_ties_svd``: TIES / DARE on the deltas, then SVD.

PEFT's TIES differs from merge.rows's (the dense ``ties``): the trim keeps ``int(density * n)``
entries (not ``round``), the sign is elected from the unweighted sum of the trimmed tensors
(>= 0 elects +), and the disjoint mean divides by the number of agreeing inputs, not their
weights. DARE keeps an entry where ``bernoulli(density)`` draws 1 and rescales by 1/density;
draws come from the generator given, A factors first then B factors (deltas for ``*_svd``),
input by input: the order PEFT draws in from torch's global generator.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import Tensor

from merge.errors import MergeError
from merge.lora import LoraFactor

SignMethod = Literal["total", "frequency"]
Space = Literal["factors", "concat", "deltas"]
# Merges of stacked tensors [N, ...] with weights [N] (PEFT's merge_utils, rewritten).
TensorMerge = Callable[[Tensor, Tensor, float | None, SignMethod, torch.Generator | None], Tensor]


def _weighted(ts: Tensor, w: Tensor) -> Tensor:
    return ts * w.view(-1, *([1] * (ts.dim() - 1)))


def _magnitude_prune(t: Tensor, density: float) -> Tensor:
    """Keep the int(density * n) entries of largest magnitude (torch.topk's choice on ties)."""
    if density >= 1.0:
        return t
    mask = torch.zeros(t.numel(), dtype=t.dtype)
    mask[torch.topk(t.abs().reshape(-1), k=int(density * t.numel())).indices] = 1
    return t * mask.view(t.shape)


def _random_prune(t: Tensor, density: float, gen: torch.Generator | None) -> Tensor:
    """DARE: keep each entry with probability ``density``, rescale the survivors."""
    if density >= 1.0:
        return t
    keep = torch.bernoulli(torch.full_like(t, density), generator=gen)
    return t * keep / density


def _disjoint(ts: Tensor, w: Tensor, sign_method: SignMethod) -> Tensor:
    """PEFT's TIES merge of already-pruned tensors: elect a sign, mean over those that agree."""
    sign = ts.sign()
    votes = ts.sum(0) if sign_method == "total" else sign.sum(0)
    agree = sign == torch.where(votes >= 0, 1.0, -1.0)
    total = (_weighted(ts, w) * agree).sum(0)
    return total / torch.clamp(agree.sum(0), min=1.0)


def task_arithmetic(ts: Tensor, w: Tensor, *_: object) -> Tensor:
    return _weighted(ts, w).sum(0)


def ties(
    ts: Tensor, w: Tensor, density: float | None, sign_method: SignMethod, _gen: object = None
) -> Tensor:
    assert density is not None
    return _disjoint(torch.stack([_magnitude_prune(t, density) for t in ts]), w, sign_method)


def dare_linear(
    ts: Tensor, w: Tensor, density: float | None, _sign: object, gen: torch.Generator | None
) -> Tensor:
    assert density is not None
    return task_arithmetic(torch.stack([_random_prune(t, density, gen) for t in ts]), w)


def dare_ties(
    ts: Tensor,
    w: Tensor,
    density: float | None,
    sign_method: SignMethod,
    gen: torch.Generator | None,
) -> Tensor:
    assert density is not None
    pruned = torch.stack([_random_prune(t, density, gen) for t in ts])
    return _disjoint(pruned, w, sign_method)


@dataclass(frozen=True)
class LoraCombination:
    """One combination: where it works (factors, concatenation, deltas) and with what merge."""

    name: str
    space: Space
    merge: TensorMerge | None  # None for cat
    uses_density: bool = False


# A sibling of merge.methods.METHODS rather than rows of it: these functions take factors of
# adapters and return factors, while METHODS's dense functions return rows of dense tensors.
LORA_COMBINATIONS: dict[str, LoraCombination] = {
    c.name: c
    for c in (
        LoraCombination("linear", "factors", task_arithmetic),
        LoraCombination("cat", "concat", None),
        LoraCombination("svd", "deltas", task_arithmetic),
        LoraCombination("ties", "factors", ties, True),
        LoraCombination("ties_svd", "deltas", ties, True),
        LoraCombination("dare_linear", "factors", dare_linear, True),
        LoraCombination("dare_linear_svd", "deltas", dare_linear, True),
        LoraCombination("dare_ties", "factors", dare_ties, True),
        LoraCombination("dare_ties_svd", "deltas", dare_ties, True),
    )
}
Combination = Literal[
    "linear",
    "cat",
    "svd",
    "ties",
    "ties_svd",
    "dare_linear",
    "dare_linear_svd",
    "dare_ties",
    "dare_ties_svd",
]


class LoraCombineParams(BaseModel):
    """``parameters`` of a merge into an adapter (``output.format: lora``)."""

    model_config = ConfigDict(extra="forbid", validate_by_alias=True, validate_by_name=False)

    combination: Combination
    weights: list[float] | None = Field(None, alias="weight")
    density: float | None = Field(None, gt=0.0, le=1.0)  # ties and dare combinations
    rank: int | None = Field(None, ge=1)  # svd combinations (default: the largest input rank)
    majority_sign_method: SignMethod = "total"  # ties and dare_ties combinations
    seed: int = 0  # dare combinations

    @model_validator(mode="after")
    def _fits(self) -> LoraCombineParams:
        c = LORA_COMBINATIONS[self.combination]
        if c.uses_density and self.density is None:
            raise ValueError(f"combination {self.combination!r} needs 'density'")
        if not c.uses_density and self.density is not None:
            raise ValueError(f"combination {self.combination!r} takes no 'density'")
        if self.rank is not None and c.space != "deltas":
            raise ValueError(f"'rank' is only used by svd combinations, not {self.combination!r}")
        return self


def output_rank(combination: str, ranks: Sequence[int], rank: int | None = None) -> int:
    """The merged adapter's r from the inputs' ranks (each adapter's largest), as PEFT sets it."""
    c = LORA_COMBINATIONS[combination]
    if c.space == "concat":
        return sum(ranks)
    if c.space == "deltas":
        return rank or max(ranks)
    if len(set(ranks)) != 1:
        raise MergeError(
            f"combination {combination!r} needs adapters of one rank, got ranks {list(ranks)}; "
            "use cat or an svd combination"
        )
    return ranks[0]


def combine(
    factors: Sequence[LoraFactor | None],
    weights: Sequence[float],
    combination: str,
    rank: int,
    *,
    density: float | None = None,
    majority_sign_method: SignMethod = "total",
    generator: torch.Generator | None = None,
    name: str = "weight",
) -> tuple[Tensor, Tensor]:
    """The merged (A [rank, in], B [out, rank]) of one weight, float32, scale folded in.

    ``rank`` is ``output_rank(...)``; ``generator`` feeds the DARE draws (one per weight in
    builds: merge.task_vectors.tensor_generator).
    """
    c = LORA_COMBINATIONS[combination]
    if len(weights) != len(factors):
        raise MergeError(f"{name}: {len(weights)} weights for {len(factors)} adapters")
    valid = [(f, float(w)) for f, w in zip(factors, weights, strict=True) if f is not None]
    if not valid:
        raise MergeError(f"{name}: no adapter changes this weight")
    if c.space == "concat":
        return _cat(valid, rank)
    if c.space == "deltas":
        return _svd(valid, c, rank, density, majority_sign_method, generator, name)
    ranks = sorted({f.rank for f, _ in valid})
    if ranks != [rank]:
        raise MergeError(f"{name}: combination {combination!r} needs rank {rank}, got {ranks}")
    assert c.merge is not None
    w_a, w_b = [], []
    for f, w in valid:
        ws = w * f.scale
        w_a.append(math.sqrt(abs(ws)) * (1 if ws >= 0 else -1))  # the sign on one side only
        w_b.append(math.sqrt(abs(ws)))
    a = c.merge(
        torch.stack([f.a.float() for f, _ in valid]),
        torch.tensor(w_a),
        density,
        majority_sign_method,
        generator,
    )
    b = c.merge(
        torch.stack([f.b.float() for f, _ in valid]),
        torch.tensor(w_b),
        density,
        majority_sign_method,
        generator,
    )
    return a, b


def _cat(valid: list[tuple[LoraFactor, float]], rank: int) -> tuple[Tensor, Tensor]:
    a = torch.cat([f.a.float() * w * f.scale for f, w in valid], dim=0)
    b = torch.cat([f.b.float() for f, _ in valid], dim=1)
    pad = rank - a.shape[0]
    if pad:  # PEFT fills the first rows of A / columns of B and leaves the rest zero
        a = torch.cat([a, a.new_zeros(pad, a.shape[1])], dim=0)
        b = torch.cat([b, b.new_zeros(b.shape[0], pad)], dim=1)
    return a, b


def _svd(
    valid: list[tuple[LoraFactor, float]],
    c: LoraCombination,
    rank: int,
    density: float | None,
    sign_method: SignMethod,
    gen: torch.Generator | None,
    name: str,
) -> tuple[Tensor, Tensor]:
    assert c.merge is not None
    first = valid[0][0]
    out, inp = int(first.b.shape[0]), int(first.a.shape[1])
    if rank > min(out, inp):
        raise MergeError(f"{name}: rank {rank} exceeds the weight's smaller side {min(out, inp)}")
    deltas = torch.stack([f.delta() for f, _ in valid])
    merged = c.merge(deltas, torch.tensor([w for _, w in valid]), density, sign_method, gen)
    # The reduced SVD has the same leading triplets as PEFT's full one, without its
    # [out, out] and [in, in] bases; singular vectors are unique up to sign, B A is not.
    u, s, vh = torch.linalg.svd(merged, full_matrices=False)
    return vh[:rank].contiguous(), (u[:, :rank] @ torch.diag(s[:rank])).contiguous()
