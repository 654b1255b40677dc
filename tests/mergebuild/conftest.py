"""Tiny checkpoints for the merge-build tests (written once per session)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from composer.tiny_models import make_tiny_llama, perturb_ffn

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
