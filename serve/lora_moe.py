"""vLLM's Llama with Composer's shared-base LoRA-MoE layers (`lora: shared` builds).

The MoE layers are models.lora_moe.LoraMoeBlock itself (one implementation of the maths for
transformers and vLLM), with the serving hooks set: per-token expert masks added to the router
logits (serve/masking.py, the same masks, defaults and fail-closed rules as Mixtral / FlexOlmo)
and a zero output for tokens allowed no expert. The block runs in plain torch: vLLM's fused MoE
has no low-rank expert deltas on CPU. Attention, norms and dense layers are vLLM's Llama.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from vllm.model_executor.models.llama import LlamaForCausalLM

from models.lora_moe import LoraMoeBlock, moe_layer_ranks
from serve.masked_models import install_request_masks
from serve.masking import apply_mask, zero_dead_rows


class ComposerLoraMoeForCausalLM(LlamaForCausalLM):
    def __init__(self, *, vllm_config: Any, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        config = vllm_config.model_config.hf_config
        self._moe_prefixes: tuple[str, ...] = ()
        for i, ranks in moe_layer_ranks(config).items():
            block = LoraMoeBlock(config, ranks)
            block.logits_hook = apply_mask
            block.output_hook = zero_dead_rows
            self.model.layers[i].mlp = block
            self._moe_prefixes += (f"model.layers.{i}.mlp.",)
        install_request_masks(self, vllm_config)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """MoE-layer tensors go straight to our blocks (vLLM's Llama loader would fuse their
        gate/up projections); everything else to vLLM's Llama loader."""
        params = dict(self.named_parameters())
        ours: set[str] = set()

        def rest() -> Iterable[tuple[str, torch.Tensor]]:
            for name, tensor in weights:
                if name.startswith(self._moe_prefixes):
                    if name not in params:
                        raise ValueError(f"unexpected tensor {name} in a LoRA-MoE layer")
                    params[name].data.copy_(tensor)
                    ours.add(name)
                else:
                    yield name, tensor

        loaded = super().load_weights(rest())
        return set(loaded) | ours
