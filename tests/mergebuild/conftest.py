"""Tiny checkpoints for the merge-build tests (written once per session)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from composer.tiny_models import make_tiny_llama, make_tiny_lora, perturb_ffn

# Tiny models run fastest on one thread, and the machine's 2 cores are shared.
torch.set_num_threads(1)

TEXT = {
    "code": "def add(a, b):\n    return a + b\n\nclass Stack:\n    def push(self, x): ...\n" * 30,
    "legal": "Permission is hereby granted, free of charge, to any person obtaining a copy\n" * 30,
    "manuals": ".TH LS 1\n.SH NAME\nls \\- list directory contents\n.SH SYNOPSIS\n" * 30,
}


def make_tiny_mixtral(out_dir: Path, seed: int = 0, experts: int = 4, top_k: int = 2) -> Path:
    """A random MixtralForCausalLM (hidden 128, 2 heads, 2 layers) saved with save_pretrained."""
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(seed)
    cfg = MixtralConfig(
        vocab_size=256,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=256,
        num_local_experts=experts,
        num_experts_per_tok=top_k,
        tie_word_embeddings=False,
    )
    model = MixtralForCausalLM(cfg).eval()
    model.save_pretrained(out_dir, safe_serialization=True)
    return Path(out_dir)


@pytest.fixture(scope="session")
def models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("mergebuild")
    make_tiny_llama(root / "base", seed=0)
    perturb_ffn(root / "base", root / "code", seed=1, scale=0.05)
    perturb_ffn(root / "base", root / "legal", seed=2, scale=0.05)
    make_tiny_llama(root / "wide", seed=0, intermediate_size=320)
    make_tiny_mixtral(root / "moe")
    make_tiny_mixtral(root / "moe8", seed=1, experts=8)
    cal = root / "cal"
    cal.mkdir()
    for name, text in TEXT.items():
        (cal / f"{name}.txt").write_text(text)
    return root


@pytest.fixture(scope="session")
def loras(models: Path) -> Path:
    """PEFT adapters of models/base beside the other tiny models: lora_a (FFN, rank 4), lora_b
    (q_proj and two FFN weights, alpha 4), lora_c (FFN, rank 6), and lora_a_full / lora_b_full,
    the full checkpoints merge.lora.apply_lora makes of the first two."""
    from merge.lora import apply_lora, lora_factors

    root = models
    make_tiny_lora(root / "base", root / "lora_a", seed=11)
    make_tiny_lora(root / "base", root / "lora_b", seed=12, alpha=4.0,
                   targets=("q_proj", "up_proj", "down_proj"))  # fmt: skip
    make_tiny_lora(root / "base", root / "lora_c", seed=13, rank=6, alpha=12.0)
    base_sd = load_file(root / "base" / "model.safetensors")
    for n in ("lora_a", "lora_b"):
        config = json.loads((root / n / "adapter_config.json").read_text())
        factors = lora_factors(load_file(root / n / "adapter_model.safetensors"), config)
        full = root / f"{n}_full"
        full.mkdir()
        shutil.copy(root / "base" / "config.json", full / "config.json")
        save_file(apply_lora(base_sd, factors), full / "model.safetensors")
    return root
