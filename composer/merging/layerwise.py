"""A checkpoint's transformers model that holds one decoder layer at a time.

Routing statistics (M-SMoE) need forward passes of the whole MoE, which used to load it all
(and a second copy as a state dict). Here the model is built on the meta device; the weights
outside the decoder layers (embeddings, final norm) are read once, and each decoder layer is
read from the checkpoint by a forward pre-hook and dropped back to meta by a forward hook. The
modules and operations are transformers' own, so the forward computes what
``from_pretrained(path, dtype=float32)`` computes, in about one layer of memory. Each forward
call reads every layer again (from the page cache).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from composer.checkpoint import Checkpoint
from composer.heap import trim_heap
from merge.moe_layer import moe_layer_prefixes, moe_layer_tensors, read_moe_layer
from registry.tensor_names import layer_of


def layer_state(ck: Checkpoint, i: int) -> dict[str, torch.Tensor]:
    """Decoder layer i's tensors as its module names them (float32): a Mixtral block in the
    checkpoint layout becomes transformers' fused experts (merge.moe_layer)."""
    prefix = f"model.layers.{i}."
    sd = {k: ck.read(k) for k in ck.tensor_names() if k.startswith(prefix)}
    for _idx, (p, layout) in moe_layer_prefixes(sd).items():
        if layout == "checkpoint":
            moe = read_moe_layer(sd, p, layout)
            for k in [k for k in sd if k.startswith(f"{p}.block_sparse_moe.")]:
                del sd[k]
            sd.update(moe_layer_tensors(moe, p, "fused"))
    return {k[len(prefix) :]: v.float() for k, v in sd.items()}


@contextmanager
def layerwise_model(ck: Checkpoint) -> Iterator[nn.Module]:
    """The causal-LM model of ``ck`` in float32, decoder layers loaded only while they run."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(str(ck.path))
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    inner = model.model
    inner.rotary_emb = type(inner.rotary_emb)(config=model.config)  # buffers made at init
    resident = {k: ck.read(k).float() for k in ck.tensor_names() if layer_of(k) is None}
    resident = {k: v for k, v in resident.items() if k != "lm_head.weight"}  # never needed
    model.load_state_dict(resident, strict=False, assign=True)

    def load(i: int) -> Any:
        def pre(module: nn.Module, _args: Any) -> None:
            module.load_state_dict(layer_state(ck, i), strict=True, assign=True)

        return pre

    def drop(module: nn.Module, _args: Any, _out: Any) -> None:
        module.to("meta")
        trim_heap()

    handles = []
    for i, layer in enumerate(inner.layers):
        handles.append(layer.register_forward_pre_hook(load(i)))
        handles.append(layer.register_forward_hook(drop))
    try:
        yield model.eval()
    finally:
        for h in handles:
            h.remove()
