"""vLLM general plugin: registers the expert-masking variants of the composed architectures,
and fixes vLLM CPU's LoRA ops for tokens that run no adapter (serve/lora_cpu.py).

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

    archs = dict(MASKED_ARCHITECTURES)
    try:  # AutoConfig must know composer_lora_moe before vLLM reads such a config
        import models  # noqa: F401
    except ImportError as e:  # an install without models/: every other build still serves
        import logging

        logging.getLogger(__name__).warning("Composer: no LoRA-MoE support (%s)", e)
        archs.pop("ComposerLoraMoeForCausalLM")
    for arch, target in archs.items():
        ModelRegistry.register_model(arch, target)
    from serve.lora_cpu import install

    install()  # per-request adapters: base requests in a mixed batch run no adapter on CPU too
    _registered = True
