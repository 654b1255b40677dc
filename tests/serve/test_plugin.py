"""The vLLM general plugin is installed and maps the composed architectures to masked classes."""

from __future__ import annotations

from importlib.metadata import entry_points


def test_entry_point_is_declared() -> None:
    eps = {ep.name: ep.value for ep in entry_points(group="vllm.general_plugins")}
    assert eps.get("composer_masks") == "serve.vllm_plugin:register"


def test_register_overrides_the_composed_architectures_idempotently() -> None:
    from vllm import ModelRegistry

    from serve.vllm_plugin import register

    register()
    register()
    for arch in ("MixtralForCausalLM", "FlexOlmoForCausalLM"):
        cls = ModelRegistry._try_load_model_cls(arch)
        assert cls is not None and cls.__name__ == f"Masked{arch}", arch


def test_register_adds_the_lora_moe_architecture_and_its_config() -> None:
    from transformers import AutoConfig
    from vllm import ModelRegistry

    from serve.vllm_plugin import register

    register()
    cls = ModelRegistry._try_load_model_cls("ComposerLoraMoeForCausalLM")
    assert cls is not None and cls.__module__ == "serve.lora_moe"
    assert AutoConfig.for_model("composer_lora_moe").model_type == "composer_lora_moe"
