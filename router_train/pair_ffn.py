"""The 2-expert FlexOlmo MoE a data owner trains: public FFN (frozen) + its own FFN (trained).

Routing follows FlexOlmo: one router row per expert, ``logit_e = row_e . x`` (+ a scalar bias on the
new expert), softmax over the experts, top-k, no renormalisation of the kept probabilities. With two
experts and the default k = 2 the output is ``p0 * FFN_public(x) + p1 * FFN_expert(x)``.

Router convention (see README.md in this folder): the public row is all zeros and frozen. Softmax is
shift-invariant, so any shared public row r0 can be subtracted from every row without changing the
routing; fixing r0 = 0 makes it identical for every data owner with no public data at all, and the
composer must use the same zero row for the public expert. The expert row starts as the unit vector
of its domain embedding ``e`` and the bias as ``-|e|``: the initial logit ``u . (x - e)`` is zero on
average over the owner's own tokens, negative for tokens that point less towards the domain.
"""

from __future__ import annotations

import copy

import torch
from torch import nn


def public_router_row(hidden_size: int) -> torch.Tensor:
    """The public expert's router row: zeros, the reference logit every expert trains against."""
    return torch.zeros(hidden_size, dtype=torch.float32)


def init_router_from_domain_embedding(
    domain_embedding: torch.Tensor, bias_margin: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (row, bias) for a new expert from its domain embedding ``e``.

    row = e / |e|, bias = -|e| - bias_margin: the logit ``row . x + bias`` is the signed length of
    ``x - e`` along the domain direction, so the expert starts at p = 1/2 against the public
    expert on an average in-domain token. ``bias_margin`` > 0 starts it more conservatively
    (FlexOlmo's negative bias).
    """
    e = domain_embedding.detach().to(torch.float32)
    norm = e.norm()
    if not torch.isfinite(norm) or norm == 0:
        raise ValueError("domain embedding must be finite and non-zero")
    return e / norm, (-norm - bias_margin).reshape(())


class PairFFN(nn.Module):
    """Drop-in replacement for a decoder layer's ``mlp``: public FFN + trainable expert FFN."""

    def __init__(
        self,
        public_ffn: nn.Module,
        expert_ffn: nn.Module | None = None,
        *,
        expert_row: torch.Tensor,
        expert_bias: torch.Tensor | float,
        public_row: torch.Tensor | None = None,
        top_k: int = 2,
    ) -> None:
        super().__init__()
        if top_k not in (1, 2):
            raise ValueError(f"top_k must be 1 or 2 with two experts, got {top_k}")
        hidden = expert_row.numel()
        self.top_k = top_k
        self.public_ffn = public_ffn
        self.expert_ffn = expert_ffn if expert_ffn is not None else copy.deepcopy(public_ffn)
        row0 = public_router_row(hidden) if public_row is None else public_row
        # A buffer, not a parameter: the public row never trains and never reaches an optimiser.
        self.register_buffer("public_row", row0.detach().to(torch.float32).clone())
        self.expert_row = nn.Parameter(expert_row.detach().to(torch.float32).clone())
        bias = torch.as_tensor(expert_bias, dtype=torch.float32).detach().clone().reshape(())
        self.expert_bias = nn.Parameter(bias)
        for p in self.public_ffn.parameters():
            p.requires_grad_(False)

    def router_logits(self, x: torch.Tensor) -> torch.Tensor:
        """[..., 2] float32 logits: public (row 0) and expert (row 1 + bias)."""
        xf = x.to(torch.float32)
        rows = torch.stack([self.public_row, self.expert_row])  # [2, hidden]
        bias = torch.stack([torch.zeros_like(self.expert_bias), self.expert_bias])
        return xf @ rows.t() + bias

    def routing_weights(self, x: torch.Tensor) -> torch.Tensor:
        """[..., 2] weights after softmax and top-k (dropped experts get 0, no renormalisation)."""
        probs = torch.softmax(self.router_logits(x), dim=-1)
        if self.top_k == 2:
            return probs
        # Ties go to the public expert, so exactly one expert survives per token.
        public_wins = probs[..., 0] >= probs[..., 1]
        return probs * torch.stack([public_wins, ~public_wins], dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.routing_weights(x).to(x.dtype)
        return w[..., 0:1] * self.public_ffn(x) + w[..., 1:2] * self.expert_ffn(x)

    def expert_parameters(self) -> list[nn.Parameter]:
        """The expert FFN's own parameters: all of a full copy's, only the factors of a LoRA
        expert (router_train.lora_ffn), whose base weights are the public FFN's, shared."""
        public = {id(p) for p in self.public_ffn.parameters()}
        return [p for p in self.expert_ffn.parameters() if id(p) not in public]

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [*self.expert_parameters(), self.expert_row, self.expert_bias]
