"""Low-rank plus sparse compression of merged experts (MC-SMoE's "compress" step).

W ~ U V + S with U [m, r], V [r, n] and S holding the largest-magnitude entries of the residual
(a fraction ``sparse_density`` of all entries), fitted by a few alternating rounds
(U V = best rank-r fit of W - S, then S = top entries of W - U V). The saving is in this
in-memory structure only: the checkpoint stores U V + S back as a dense matrix so that a standard
Mixtral loader (transformers, vLLM) reads it unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor

from merge.errors import MergeError
from merge.moe_layer import MoELayer


class LowRankParams(BaseModel):
    """``compress: low_rank`` parameters."""

    model_config = ConfigDict(extra="forbid")

    rank: int = Field(ge=1)
    sparse_density: float = Field(0.0, ge=0.0, lt=1.0)
    iters: int = Field(3, ge=1)


@dataclass
class LowRankSparse:
    u: Tensor  # [m, r]
    v: Tensor  # [r, n]
    sparse: Tensor  # [m, n] torch sparse COO

    def dense(self) -> Tensor:
        return self.u @ self.v + self.sparse.to_dense()

    def num_stored(self) -> int:
        """Stored numbers (indices of the sparse part not counted)."""
        return self.u.numel() + self.v.numel() + self.sparse._nnz()


def _top_entries(x: Tensor, density: float) -> Tensor:
    k = round(density * x.numel())
    out = torch.zeros_like(x)
    if k > 0:
        idx = x.reshape(-1).abs().topk(k).indices
        out.view(-1)[idx] = x.reshape(-1)[idx]
    return out


def low_rank_sparse(
    w: Tensor, rank: int, sparse_density: float = 0.0, iters: int = 3, name: str = "matrix"
) -> LowRankSparse:
    """Fit W ~ U V + S (float32) as described in the module docstring."""
    if w.dim() != 2:
        raise MergeError(f"{name}: low-rank compression needs a matrix, got {tuple(w.shape)}")
    if not 1 <= rank <= min(w.shape):
        raise MergeError(
            f"{name}: parameter 'rank' is {rank}; it must be in [1, {min(w.shape)}] for shape "
            f"{tuple(w.shape)}"
        )
    if not 0.0 <= sparse_density < 1.0:
        raise MergeError(f"{name}: parameter 'sparse_density' is {sparse_density}; need [0, 1)")
    w = w.float()
    s = torch.zeros_like(w)
    for _ in range(iters if sparse_density > 0 else 1):
        uu, sv, vh = torch.linalg.svd(w - s, full_matrices=False)
        u, v = uu[:, :rank] * sv[:rank], vh[:rank]
        s = _top_entries(w - u @ v, sparse_density)
    return LowRankSparse(u, v, s.to_sparse())


def compress_layer(
    layer: MoELayer, params: LowRankParams, where: str = "MoE layer"
) -> tuple[MoELayer, dict[str, list[LowRankSparse]]]:
    """Compress every expert matrix; returns the dense reconstruction and the factors."""
    factors: dict[str, list[LowRankSparse]] = {}
    dense: dict[str, Tensor] = {}
    for wname in ("w1", "w3", "w2"):
        mats = getattr(layer, wname)
        fs = [
            low_rank_sparse(
                mats[e],
                params.rank,
                params.sparse_density,
                params.iters,
                name=f"{where} expert {e} {wname}",
            )
            for e in range(mats.shape[0])
        ]
        factors[wname] = fs
        dense[wname] = torch.stack([f.dense() for f in fs]).to(mats.dtype)
    return MoELayer(layer.router, dense["w1"], dense["w3"], dense["w2"]), factors
