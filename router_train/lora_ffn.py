"""A LoRA expert FFN: the public FFN's own (frozen, shared) weights plus a trained low-rank delta.

A data owner who trains a LoRA instead of a full FFN copy gets an expert ``W + scale * B @ A`` on
each targeted projection, with PEFT's conventions (A [r, in], B [out, r], scale = alpha / r;
A Kaiming-uniform, B zero, so the expert starts as exactly the public FFN, like a full copy
does). The public weights are shared, not copied: the only new parameters are the factors, and
an owner's artifact is a few MB (composer/train/expert.py writes it as a PEFT adapter).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence

import torch
from torch import nn

FFN_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")


class LoraLinear(nn.Module):
    """``base(x) + scale * (x @ A.T) @ B.T`` around a frozen ``nn.Linear`` (PEFT's LoRA layer)."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float) -> None:
        super().__init__()
        if rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {rank}")
        self.base = base
        self.scale = float(alpha) / rank
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, dtype=torch.float32))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, dtype=torch.float32))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # PEFT's init of lora_A

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        delta = (x.to(self.lora_A.dtype) @ self.lora_A.t()) @ self.lora_B.t()
        return self.base(x) + (self.scale * delta).to(x.dtype)


def lora_expert_ffn(
    public_ffn: nn.Module,
    rank: int,
    alpha: float,
    targets: Sequence[str] = FFN_PROJECTIONS,
) -> nn.Module:
    """A copy of ``public_ffn``'s module tree that SHARES its parameters (no weight is copied) and
    whose ``targets`` linears are wrapped in :class:`LoraLinear`. Raises ValueError naming a
    target the FFN lacks or that is not an ``nn.Linear``."""
    shared = {id(p): p for p in public_ffn.parameters()}
    shared.update({id(b): b for b in public_ffn.buffers()})
    expert = copy.deepcopy(public_ffn, memo=shared)
    for name in targets:
        child = getattr(expert, name, None)
        if not isinstance(child, nn.Linear):
            raise ValueError(
                f"{type(public_ffn).__name__} has no nn.Linear '{name}' to put a LoRA on"
            )
        setattr(expert, name, LoraLinear(child, rank, alpha))
    return expert


def lora_factors_of(expert_ffn: nn.Module) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``{projection name: (A, B)}`` of an expert made by :func:`lora_expert_ffn` (detached)."""
    return {
        name: (m.lora_A.detach(), m.lora_B.detach())
        for name, m in expert_ffn.named_children()
        if isinstance(m, LoraLinear)
    }
