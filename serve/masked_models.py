"""Masked subclasses of the composed architectures vLLM serves.

Per-request masks: serve/masking.py. MoE layers run vLLM's fused MoE with the mask added by the
gates, or our kernels (serve/moe_backend.py), as COMPOSER_MOE_BACKEND (default auto) chooses.
"""

from __future__ import annotations

from typing import Any

from vllm.logger import init_logger
from vllm.model_executor.models.mixtral import MixtralForCausalLM
from vllm.model_executor.models.transformers import TransformersMoEForCausalLM

from registry.composition import read_slot_bindings
from router_train.bias_file import read_router_bias
from serve.masking import install_gate_masks, install_runner_hook
from serve.moe_backend import BACKEND_ENV, install_composer_moe, moe_backend
from serve.policy import expert_names

logger = init_logger(__name__)


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
    backend, why = moe_backend()
    if backend == "composer":
        # Our kernels route (bias, mask) and run the experts; the gates stay vLLM's.
        if install_composer_moe(model, vllm_config, bias, dense) == 0:
            raise RuntimeError(f"{type(model).__name__}: no MoE layer found for our kernels")
    elif install_gate_masks(model, bias, dense) == 0:
        raise RuntimeError(f"{type(model).__name__}: no MoE gate found to mask")
    model.composer_moe_backend = backend
    if not vllm_config.model_config.enforce_eager:
        logger.warning(
            "Composer expert masks are per-step data read in Python: run with --enforce-eager "
            "(compiled graphs or CUDA graphs would freeze them)."
        )
    logger.info("Composer MoE backend: %s (%s; %s=auto|composer|vllm)", backend, why, BACKEND_ENV)
    install_request_masks(model, vllm_config)


def install_request_masks(model: Any, vllm_config: Any) -> None:
    """Publish each step's per-token expert mask (serve/masking.py); a request without a mask
    gets the public base slots of composition.json, none if it records none (fail closed)."""
    path = vllm_config.model_config.model
    slots = read_slot_bindings(path, expert_names(path)) or []
    default = [s.index for s in slots if s.kind == "base"]
    logger.info("Composer: requests without an expert mask use experts %s", default or "none")
    install_runner_hook(model, _num_experts(vllm_config.model_config.hf_config), default)


class MaskedMixtralForCausalLM(MixtralForCausalLM):
    """Mixtral whose routing applies each token's expert mask before top-k."""

    def __init__(self, *, vllm_config: Any, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        _install(self, vllm_config)


class MaskedFlexOlmoForCausalLM(TransformersMoEForCausalLM):
    """FlexOlmo (through vLLM's Transformers backend, routing fused into vLLM's MoE runner)."""

    def __init__(self, *, vllm_config: Any, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        _install(self, vllm_config)
