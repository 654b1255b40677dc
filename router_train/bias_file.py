"""The router bias file: FlexOlmo experts' per-layer router bias, kept beside a composed checkpoint.

Mixtral's checkpoint format has no router bias and vLLM refuses unknown tensors, so a build
writes the biases to `composer_router.safetensors` (named by `composer_router_file` in
config.json; docs/spec.md). Plain loaders ignore that file: they run the model with un-biased
routing. The format is spelled once, here: composer writes the file (composer.build) and both
readers, transformers (router_train.biased_router) and the vLLM engine (serve/masked_models.py),
read it with :func:`read_router_bias`.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

ROUTER_FILE = "composer_router.safetensors"
ROUTER_FILE_CONFIG_KEY = "composer_router_file"  # config.json field naming the file
ROUTER_FILE_META = {"composer_format": "composer-router/1", "applies_to": "router logits (added)"}

_BIAS_KEY = re.compile(r"^model\.layers\.(\d+)\.mlp\.router_bias$")


def router_bias_key(layer: int) -> str:
    """The tensor name of one layer's bias [num_experts] in the file."""
    return f"model.layers.{layer}.mlp.router_bias"


def read_router_bias(model_dir: str | Path) -> dict[int, torch.Tensor]:
    """layer -> float32 bias [num_experts]; empty when the checkpoint has no bias file."""
    model_dir = Path(model_dir)
    config_path = model_dir / "config.json"
    if not config_path.is_file():
        return {}
    name = json.loads(config_path.read_text()).get(ROUTER_FILE_CONFIG_KEY)
    if not name:
        return {}
    from safetensors import safe_open

    out: dict[int, torch.Tensor] = {}
    with safe_open(str(model_dir / name), framework="pt") as f:
        for key in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
            match = _BIAS_KEY.match(key)
            if match is None:
                raise ValueError(f"{model_dir / name}: unexpected tensor {key!r}")
            out[int(match.group(1))] = f.get_tensor(key).to(torch.float32)
    return out
