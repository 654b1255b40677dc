"""The FlexOlmo experts' router bias, which the composed checkpoint keeps beside its weights.

Mixtral's checkpoint format has no router bias and vLLM refuses unknown tensors, so a build
writes the biases to `composer_router.safetensors` (named by `composer_router_file` in
config.json; docs/spec.md). Plain loaders ignore that file: they run the model with un-biased
routing. This module reads it and applies it, in transformers (`load_composed`) and, through
serve/masking.py, in the vLLM engine, so both run the model the experts were trained as.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

_BIAS_KEY = re.compile(r"^model\.layers\.(\d+)\.mlp\.router_bias$")


def read_router_bias(model_dir: str | Path) -> dict[int, torch.Tensor]:
    """layer -> float32 bias [num_experts]; empty when the checkpoint has no bias file."""
    model_dir = Path(model_dir)
    config_path = model_dir / "config.json"
    if not config_path.is_file():
        return {}
    name = json.loads(config_path.read_text()).get("composer_router_file")
    if not name:
        return {}
    from safetensors import safe_open

    out: dict[int, torch.Tensor] = {}
    with safe_open(str(model_dir / name), framework="pt") as f:
        for key in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
            match = _BIAS_KEY.match(key)
            if match is None:
                raise ValueError(f"{model_dir / name}: unexpected tensor {key!r}")
            out[int(match.group(1))] = f.get_tensor(key).to(torch.float32)
    return out


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
