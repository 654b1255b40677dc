"""A LoRA expert artifact back in torch: the public model + that expert, as its owner trained it.

Reads only what the artifact holds (the PEFT adapter through merge.lora, PEFT's one reading in
this project, and the router row and bias of composer_expert.safetensors), so the owner-side
evaluation and benchmarks score the files, not the training run's memory. Composing LoRA experts
into a checkpoint is the build's job (composer/compose); this is the 2-expert model of one.
"""

from __future__ import annotations

import json
from pathlib import Path

from safetensors.torch import load_file
from torch import nn

from composer.train.artifact import read_expert_extras
from composer.train.evaluate import load_causal_lm
from merge.lora import lora_factors
from registry.checkpoint import ADAPTER_CONFIG, ADAPTER_WEIGHTS
from router_train.layers import decoder_layers
from router_train.lora_ffn import FFN_PROJECTIONS, LoraLinear, lora_expert_ffn
from router_train.pair_ffn import PairFFN


def load_lora_pair_model(public_dir: str | Path, adapter_dir: str | Path) -> nn.Module:
    """The public model with a PairFFN (public FFN + LoRA expert) in every layer the artifact
    trained; float32, eval mode."""
    adapter_dir = Path(adapter_dir)
    config = json.loads((adapter_dir / ADAPTER_CONFIG).read_text())
    factors = lora_factors(load_file(adapter_dir / ADAPTER_WEIGHTS), config)
    extras, meta = read_expert_extras(adapter_dir)
    model = load_causal_lm(public_dir)
    layers = decoder_layers(model)
    for i in (int(x) for x in meta["layers"].split(",")):
        public = layers[i].mlp
        present = [p for p in FFN_PROJECTIONS if f"model.layers.{i}.mlp.{p}.weight" in factors]
        expert = lora_expert_ffn(public, rank=1, alpha=1.0, targets=present)
        for proj in present:
            f = factors[f"model.layers.{i}.mlp.{proj}.weight"]
            lin = getattr(expert, proj)
            assert isinstance(lin, LoraLinear)
            lin.lora_A = nn.Parameter(f.a.float().clone(), requires_grad=False)
            lin.lora_B = nn.Parameter(f.b.float().clone(), requires_grad=False)
            lin.scale = f.scale
        layers[i].mlp = PairFFN(
            public,
            expert,
            expert_row=extras[f"model.layers.{i}.router_row"],
            expert_bias=extras[f"model.layers.{i}.router_bias"],
            public_row=extras.get(f"model.layers.{i}.public_router_row"),
            top_k=int(meta.get("top_k", "2")),
        )
    return model.eval()
