"""Checkpoint folders for the registry tests: a tiny base and experts that fit (or not) it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from composer.tiny_models import make_tiny_llama, perturb_ffn


@pytest.fixture(scope="session")
def ckpts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ckpts")
    base = make_tiny_llama(root / "base", seed=0)
    out = {"base": base}
    out["ffn"] = perturb_ffn(base, root / "ffn", seed=1)
    out["ffn2"] = perturb_ffn(base, root / "ffn2", seed=2)
    out["ffn3"] = perturb_ffn(base, root / "ffn3", seed=6)
    out["dense"] = make_tiny_llama(root / "dense", seed=3)  # same shapes, every weight differs
    out["wrong_shape"] = make_tiny_llama(root / "wrong_shape", seed=4, intermediate_size=192)
    out["lora"] = _make_lora(root / "lora", rank=4)
    out["anchor_mismatch"] = _copy_with(
        out["ffn"], root / "anchor_mismatch", "model.layers.1.self_attn.q_proj.weight"
    )
    return out


def _copy_with(src: Path, dst: Path, tensor: str) -> Path:
    """Copy a checkpoint changing one tensor by a tiny amount."""
    shutil.copytree(src, dst)
    tensors = load_file(dst / "model.safetensors")
    tensors[tensor] = tensors[tensor] + 1e-3
    save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


def _make_lora(out: Path, rank: int) -> Path:
    """A PEFT-format LoRA adapter on q_proj and v_proj of the tiny Llama (hidden 128)."""
    out.mkdir(parents=True)
    g = torch.Generator().manual_seed(5)
    tensors = {}
    for layer in range(2):
        for mod in ("q_proj", "v_proj"):
            key = f"base_model.model.model.layers.{layer}.self_attn.{mod}"
            tensors[f"{key}.lora_A.weight"] = torch.randn(rank, 128, generator=g)
            tensors[f"{key}.lora_B.weight"] = torch.zeros(128, rank)
    save_file(tensors, out / "adapter_model.safetensors", metadata={"format": "pt"})
    config = {
        "peft_type": "LORA", "r": rank, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"],
        "base_model_name_or_path": "tiny", "task_type": "CAUSAL_LM",
    }  # fmt: skip
    (out / "adapter_config.json").write_text(json.dumps(config))
    return out


@pytest.fixture
def registered(cli, ckpts, registry_templates):
    """A registry with owners alice and bob, base 'tiny' and alice's ffn expert 'code@1'
    (made once per database kind by these commands, cloned for each test)."""

    def make(t):
        t("registry", "init")
        t("registry", "add-owner", "alice")
        t("registry", "add-owner", "bob")
        t("registry", "add-base", ckpts["base"], "--name", "tiny")
        t("registry", "add-expert", ckpts["ffn"], "--name", "code", "--owner", "alice",
          "--base", "tiny", "--domain", "code")  # fmt: skip

    registry_templates.clone("registered", cli, make)
    return cli
