"""Masked subclasses of the composed architectures vLLM serves (see serve/masking.py)."""

from __future__ import annotations

from typing import Any

from vllm.model_executor.models.mixtral import MixtralForCausalLM
from vllm.model_executor.models.transformers import TransformersMoEForCausalLM

from composer.router_bias import read_router_bias
from serve.masking import install_gate_masks, install_runner_hook


def _num_experts(config: Any) -> int:
    for name in ("num_local_experts", "num_experts"):
        value = getattr(config, name, None)
        if isinstance(value, int):
            return value
    raise ValueError("config names no expert count")


def _install(model: Any, vllm_config: Any) -> None:
    config = vllm_config.model_config.hf_config
    bias = read_router_bias(vllm_config.model_config.model)
    dense = getattr(config, "composer_dense_layers", None) or ()
    if install_gate_masks(model, bias, dense) == 0:
        raise RuntimeError(f"{type(model).__name__}: no MoE gate found to mask")
    install_runner_hook(_num_experts(config))


class MaskedMixtralForCausalLM(MixtralForCausalLM):
    """Mixtral whose router adds each token's expert mask before top-k."""

    def __init__(self, *, vllm_config: Any, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        _install(self, vllm_config)


class MaskedFlexOlmoForCausalLM(TransformersMoEForCausalLM):
    """FlexOlmo (through vLLM's Transformers backend, routing fused into vLLM's MoE runner)."""

    def __init__(self, *, vllm_config: Any, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        _install(self, vllm_config)
