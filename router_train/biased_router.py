"""Run a composed checkpoint in transformers with its router bias, as its experts were trained.

transformers' Mixtral / FlexOlmo routers have no bias; :func:`attach_router_bias` swaps each MoE
router's class for a subclass whose forward adds the bias read from the router bias file
(router_train.bias_file) to the logits. Router tuning and evaluation load models this way.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from router_train.bias_file import read_router_bias


def _biased_forward(self: Any, hidden_states: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """transformers' Mixtral / FlexOlmo `TopKRouter.forward` with `self.router_bias` added to the
    logits before the softmax (same maths and dtypes otherwise)."""
    hidden_states = hidden_states.reshape(-1, self.hidden_dim)
    logits = F.linear(hidden_states, self.weight) + self.router_bias.to(hidden_states.dtype)
    probs = torch.softmax(logits, dtype=torch.float, dim=-1)
    top_value, top_index = torch.topk(probs, self.top_k, dim=-1)
    if getattr(self, "norm_topk_prob", True):  # Mixtral always renormalises
        top_value = top_value / top_value.sum(dim=-1, keepdim=True)
    return logits, top_value.to(logits.dtype), top_index


_BIASED_CLASSES: dict[type, type] = {}


def _biased_class(base: type) -> type:
    if base not in _BIASED_CLASSES:
        _BIASED_CLASSES[base] = type(
            f"Biased{base.__name__}", (base,), {"forward": _biased_forward}
        )
    return _BIASED_CLASSES[base]


def attach_router_bias(model: nn.Module, bias: dict[int, torch.Tensor]) -> int:
    """Give each MoE router of a transformers model its layer's bias; returns routers changed."""
    layers = model.model.layers  # type: ignore[union-attr]
    changed = 0
    for i, b in bias.items():
        gate = getattr(getattr(layers[i], "mlp", None), "gate", None)
        if gate is None or not hasattr(gate, "top_k") or gate.weight.shape[0] != b.numel():
            raise ValueError(f"layer {i}: no MoE router with {b.numel()} experts for the bias")
        gate.__class__ = _biased_class(type(gate))
        gate.register_buffer("router_bias", b.to(gate.weight.device), persistent=False)
        changed += 1
    return changed


def load_composed(model_dir: str | Path, dtype: torch.dtype = torch.float32) -> nn.Module:
    """A composed (or any) checkpoint in transformers, eval mode, with its router bias applied."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype).eval()
    attach_router_bias(model, read_router_bias(model_dir))
    return model
