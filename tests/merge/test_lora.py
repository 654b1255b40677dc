"""merge.lora reads PEFT adapters exactly as PEFT applies them: checked against merge_and_unload."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from composer.tiny_models import make_tiny_llama, make_tiny_lora
from merge.errors import MergeError
from merge.lora import apply_lora, lora_factors


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("base"))


def _read(adapter: Path) -> tuple[dict, dict]:
    config = json.loads((adapter / "adapter_config.json").read_text())
    return load_file(adapter / "adapter_model.safetensors"), config


def _peft_merged(base: Path, adapter: Path) -> dict[str, torch.Tensor]:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, torch_dtype=torch.float32)
    merged = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    return {k: v.detach() for k, v in merged.state_dict().items()}


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"use_rslora": True},
        {"alpha_pattern": {"up_proj": 32}, "rank_pattern": {"down_proj": 2}},
        {"targets": ("q_proj", "v_proj", "up_proj")},
    ],
    ids=["plain", "rslora", "patterns", "attention"],
)
def test_apply_lora_equals_peft_merge_and_unload(base, tmp_path, kwargs):
    adapter = make_tiny_lora(base, tmp_path / "a", seed=1, **kwargs)
    tensors, config = _read(adapter)
    factors = lora_factors(tensors, config)
    base_sd = load_file(base / "model.safetensors")
    ours = apply_lora(base_sd, factors)
    theirs = _peft_merged(base, adapter)
    assert set(factors) and all(n in base_sd for n in factors)
    for name in base_sd:
        torch.testing.assert_close(ours[name], theirs[name], rtol=0, atol=1e-6, msg=name)
    changed = [n for n in base_sd if not torch.equal(ours[n], base_sd[n])]
    assert sorted(changed) == sorted(factors)
    if "rank_pattern" in kwargs:
        assert factors["model.layers.0.mlp.down_proj.weight"].rank == 2
        assert factors["model.layers.0.mlp.up_proj.weight"].scale == 32 / 4


def test_refuses_dora_and_foreign_tensors(base, tmp_path):
    adapter = make_tiny_lora(base, tmp_path / "a", seed=1)
    tensors, config = _read(adapter)
    with pytest.raises(MergeError, match="use_dora"):
        lora_factors(tensors, {**config, "use_dora": True})
    extra = {**tensors, "base_model.model.lm_head.modules_to_save.weight": torch.zeros(2, 2)}
    with pytest.raises(MergeError, match="modules_to_save"):
        lora_factors(extra, config)
    half = {k: v for k, v in tensors.items() if "layers.0.mlp.up_proj.lora_B" not in k}
    with pytest.raises(MergeError, match="layers.0.mlp.up_proj' lacks"):
        lora_factors(half, config)
