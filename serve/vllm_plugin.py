"""vLLM general plugin: registers the expert-masking variants of the composed architectures.

vLLM calls `register()` in every process it starts (API server, engine core, workers), so it
only records class paths; the model modules are imported lazily by vLLM when a model loads.
"""

from __future__ import annotations

# Architecture name in config.json -> "module:Class" of our masked subclass.
MASKED_ARCHITECTURES: dict[str, str] = {
    "MixtralForCausalLM": "serve.masked_models:MaskedMixtralForCausalLM",
    "FlexOlmoForCausalLM": "serve.masked_models:MaskedFlexOlmoForCausalLM",
    # `lora: shared` builds (models/lora_moe.py); its config class is registered in register().
    "ComposerLoraMoeForCausalLM": "serve.lora_moe:ComposerLoraMoeForCausalLM",
}

_registered = False


def register() -> None:
    """Override the composed architectures with their masked subclasses (idempotent)."""
    global _registered
    if _registered:
        return
    from vllm import ModelRegistry

    import models  # noqa: F401  (AutoConfig must know composer_lora_moe before vLLM reads one)

    for arch, target in MASKED_ARCHITECTURES.items():
        ModelRegistry.register_model(arch, target)
    _registered = True
