"""Output architectures: which MoE class a dense base family becomes, its tensor names and config.

Experts are written per expert (``...experts.{e}.w1.weight``), the layout transformers 5 itself
saves and converts to fused tensors on load, and the one vLLM's loaders read (see docs/spec.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from registry.errors import ComposerError

PROJS = ("gate", "up", "down")

# Dense-config fields carried into the MoE config unchanged.
_SHARED_FIELDS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "hidden_act",
    "max_position_embeddings",
    "initializer_range",
    "rms_norm_eps",
    "use_cache",
    "pad_token_id",
    "bos_token_id",
    "eos_token_id",
    "tie_word_embeddings",
    "rope_parameters",
    "attention_dropout",
    "attention_bias",
    "sliding_window",
)


class ArchitectureError(ComposerError):
    """A base model family the composer cannot turn into an MoE."""


@dataclass(frozen=True)
class OutputArch:
    architecture: str
    model_type: str
    moe_prefix: str  # "block_sparse_moe" (Mixtral) or "mlp" (FlexOlmo)
    proj_names: dict[str, str]  # gate/up/down -> expert tensor name
    always_renormalises: bool  # Mixtral renormalises top-k weights; FlexOlmo has a flag

    def router_key(self, layer: int) -> str:
        return f"model.layers.{layer}.{self.moe_prefix}.gate.weight"

    def expert_key(self, layer: int, expert: int, proj: str) -> str:
        return f"model.layers.{layer}.{self.moe_prefix}.experts.{expert}.{self.proj_names[proj]}"


MIXTRAL = OutputArch(
    architecture="MixtralForCausalLM",
    model_type="mixtral",
    moe_prefix="block_sparse_moe",
    proj_names={"gate": "w1.weight", "up": "w3.weight", "down": "w2.weight"},
    always_renormalises=True,
)
FLEXOLMO = OutputArch(
    architecture="FlexOlmoForCausalLM",
    model_type="flex_olmo",
    moe_prefix="mlp",
    proj_names={"gate": "gate_proj.weight", "up": "up_proj.weight", "down": "down_proj.weight"},
    always_renormalises=False,
)
# `lora: shared` (composer/compose/lora_shared.py, models/lora_moe.py): one base FFN per layer
# plus each expert's LoRA factors; its router key is FlexOlmo's, its experts are not dense.
LORA_MOE = OutputArch(
    architecture="ComposerLoraMoeForCausalLM",
    model_type="composer_lora_moe",
    moe_prefix="mlp",
    proj_names={"gate": "gate_proj", "up": "up_proj", "down": "down_proj"},
    always_renormalises=False,
)

_FAMILIES: dict[str, OutputArch] = {"llama": MIXTRAL, "mistral": MIXTRAL, "olmo2": FLEXOLMO}


def dense_ffn_key(layer: int, proj: str) -> str:
    return f"model.layers.{layer}.mlp.{proj}_proj.weight"


def output_arch(base_config: dict[str, Any]) -> OutputArch:
    mt = base_config.get("model_type")
    if mt not in _FAMILIES:
        known = ", ".join(sorted(_FAMILIES))
        raise ArchitectureError(f"base model_type {mt!r} is not supported; expected one of {known}")
    if base_config.get("mlp_bias"):
        raise ArchitectureError("bases with mlp_bias=true cannot become Mixtral/FlexOlmo experts")
    if mt in ("llama", "mistral") and base_config.get("attention_bias"):
        raise ArchitectureError("MixtralForCausalLM has no attention bias; the base has one")
    return _FAMILIES[mt]


def moe_config(
    base_config: dict[str, Any],
    arch: OutputArch,
    *,
    num_experts: int,
    top_k: int,
    norm_topk_prob: bool,
    expert_names: list[str],
    dense_layers: list[int],
    dtype: str,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """config.json of the composed model.

    Written as a plain dict (importing transformers' config classes costs ~185 MB of RSS, more
    than a whole streamed layer); the tests load every output with the transformers classes.
    """
    fields = {k: base_config[k] for k in _SHARED_FIELDS if k in base_config}
    if "rope_parameters" not in fields and "rope_theta" in base_config:
        fields["rope_parameters"] = {
            "rope_type": "default",
            "rope_theta": base_config["rope_theta"],
        }
    out: dict[str, Any] = {
        **fields,
        "architectures": [arch.architecture],
        "model_type": arch.model_type,
        "num_experts_per_tok": top_k,
        "output_router_logits": False,
        "dtype": dtype,
        "transformers_version": _version("transformers"),
        "composer_experts": list(expert_names),
        "composer_dense_layers": list(dense_layers),
        **(extra or {}),
    }
    if arch is MIXTRAL:
        out.pop("attention_bias", None)
        out.setdefault("sliding_window", None)
        out.update(
            num_local_experts=num_experts, router_aux_loss_coef=0.001, router_jitter_noise=0.0
        )
    else:
        out.pop("sliding_window", None)
        out.update(
            num_experts=num_experts, norm_topk_prob=norm_topk_prob, router_aux_loss_coef=0.01
        )
    return out


def _version(dist: str) -> str:
    import importlib.metadata

    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"
