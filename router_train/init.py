"""Router initialisation: pure tensor functions (torch only).

The maths of every `router.init` a build can ask for; composer/routers.py gathers the inputs
(calibration hidden states, expert rows) and calls these.

A router for one MoE layer is a weight matrix [num_experts, hidden]; logits are ``x @ W.T``.
"""

from __future__ import annotations

import torch


def random_router(
    num_experts: int, hidden: int, generator: torch.Generator, std: float = 0.02
) -> torch.Tensor:
    """Seeded normal init (the usual sparse-upcycling starting point)."""
    return torch.randn(num_experts, hidden, generator=generator, dtype=torch.float32) * std


def hidden_mean_router(per_expert_inputs: list[torch.Tensor]) -> torch.Tensor:
    """Row e = mean FFN input over expert e's calibration tokens ([tokens, hidden] each)."""
    return torch.stack([x.float().mean(dim=0) for x in per_expert_inputs])


def gating_logit_normalise(weight: torch.Tensor, tokens: torch.Tensor, lam: float) -> torch.Tensor:
    """Skywork-MoE gating-logit normalisation, folded statically into the router weight.

    Skywork normalises each token's logits to zero mean and standard deviation ``lam`` before
    the softmax. The mean shift is exact as a weight change (centre the rows: softmax ignores a
    shift common to all experts); the per-token division cannot be expressed in a plain
    Mixtral/FlexOlmo router, so the rows are scaled by ``lam`` over the mean per-token standard
    deviation measured on calibration tokens.
    """
    w = weight.float() - weight.float().mean(dim=0, keepdim=True)
    logits = tokens.float() @ w.T
    std = logits.std(dim=-1, unbiased=False).mean()
    if float(std) == 0.0:
        return w
    return w * (lam / std)


def stack_rows(rows: list[torch.Tensor | None], hidden: int) -> torch.Tensor:
    """Router from per-expert rows; a missing row (None) is zeros (logit 0 for every token)."""
    return torch.stack(
        [r.float().reshape(hidden) if r is not None else torch.zeros(hidden) for r in rows]
    )
