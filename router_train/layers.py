"""Where the FFNs are: the decoder layers of a transformers causal LM and which of them to train.

Training, tuning and calibration all reach a layer's FFN as ``model.model.layers[i].mlp`` (Llama,
OLMo-2, Mixtral, FlexOlmo); this module is the one place that knows it.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layers of a Llama / OLMo-2 style ``*ForCausalLM`` (``model.model.layers``)."""
    layers = getattr(getattr(model, "model", None), "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise TypeError(f"{type(model).__name__}: no model.layers; not a Llama/OLMo-2 style model")
    return layers


def ffn_modules(model: nn.Module, layers: Sequence[int]) -> dict[int, nn.Module]:
    """layer -> its FFN module (``layer.mlp``), in the given order."""
    decoder = decoder_layers(model)
    return {i: decoder[i].mlp for i in layers}


def parse_layers(spec: str | Sequence[int] | None, num_layers: int) -> list[int]:
    """Layers to train: None/"all", a list, "0,4,8", "every:4" (0,4,8,...) or "last:8"."""
    if spec is None or spec == "all":
        out = list(range(num_layers))
    elif isinstance(spec, str) and spec.startswith("every:"):
        out = list(range(0, num_layers, int(spec.split(":", 1)[1])))
    elif isinstance(spec, str) and spec.startswith("last:"):
        n = int(spec.split(":", 1)[1])
        out = list(range(max(0, num_layers - n), num_layers))
    elif isinstance(spec, str):
        out = [int(x) for x in spec.split(",") if x.strip()]
    else:
        out = [int(x) for x in spec]
    out = sorted(set(out))
    if not out or out[0] < 0 or out[-1] >= num_layers:
        raise ValueError(f"layers {spec!r} invalid for a model with {num_layers} layers")
    return out
