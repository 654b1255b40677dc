"""ComposerLoraMoeForCausalLM: a Llama whose MoE layers share one base FFN across experts, each
expert adding its own LoRA deltas (MixLoRA-style), as `lora: shared` builds write it.

An expert e of a MoE layer is the FFN with weights W + s * B @ A (per projection it adapts):

    g_e = W_g x + s_g B_g (A_g x)        u_e = W_u x + s_u B_u (A_u x)
    h_e = act(g_e) * u_e                 y_e = W_d h_e + s_d B_d (A_d h_e)

and the layer outputs sum_e w_e y_e over the token's top-k experts (router as in Mixtral /
FlexOlmo: softmax of x @ R^T + bias, top-k, renormalised when `norm_topk_prob`). The base
projections W_g x, W_u x run once per token for all its experts, and because W_d is shared,
sum_e w_e W_d h_e = W_d (sum_e w_e h_e) runs once too. This is the same function a materialised
build (Mixtral / FlexOlmo with each expert's dense W + s B @ A) computes, to float rounding.

Tensor names per MoE layer i (dense layers are plain Llama MLPs under the same base names):
    model.layers.i.mlp.gate.weight [E, hidden], model.layers.i.mlp.gate.bias [E]  (router)
    model.layers.i.mlp.{gate,up,down}_proj.weight                                (base FFN)
    model.layers.i.mlp.experts.e.{gate,up,down}_proj.{lora_A [r, in], lora_B [out, r], scale []}
Which (layer, expert, projection) has factors, and their ranks, is `config.lora_ranks`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from huggingface_hub.dataclasses import strict
from torch import nn
from torch.nn import functional as F
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.activations import ACT2FN

PROJS = ("gate_proj", "up_proj", "down_proj")


@strict
class ComposerLoraMoeConfig(LlamaConfig):
    """LlamaConfig plus the MoE layout: expert count, top-k, which layers are MoE and the LoRA
    ranks of each (MoE layer, expert, projection), aligned with `moe_layers`."""

    model_type = "composer_lora_moe"

    num_experts: int = 1
    num_experts_per_tok: int = 1
    norm_topk_prob: bool = True
    moe_layers: list[int] | None = None
    # lora_ranks[j][e] = {"gate_proj": r, ...} for MoE layer moe_layers[j]; absent = no delta
    lora_ranks: list[list[dict[str, int]]] | None = None


class LowRank(nn.Module):
    """One adapted projection's delta: scale * B @ A, applied as two thin matmuls."""

    def __init__(self, rank: int, in_features: int, out_features: int):
        super().__init__()
        self.lora_A = nn.Parameter(torch.zeros(rank, in_features))
        self.lora_B = nn.Parameter(torch.zeros(out_features, rank))
        self.scale = nn.Parameter(torch.ones(()), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.linear(x, self.lora_A), self.lora_B) * self.scale


class LoraMoeBlock(nn.Module):
    """Router + shared base FFN + per-expert low-rank deltas (the module docstring's maths).

    `logits_hook` / `output_hook` let a server add per-token expert masks to the router logits and
    zero the output of tokens allowed no expert (serve/lora_moe.py); both are None here.
    """

    def __init__(self, config: ComposerLoraMoeConfig, ranks: list[dict[str, int]]):
        super().__init__()
        hidden, inter = config.hidden_size, config.intermediate_size
        self.num_experts = config.num_experts
        self.top_k = config.num_experts_per_tok
        self.norm_topk_prob = config.norm_topk_prob
        self.gate = nn.Linear(hidden, config.num_experts, bias=True)
        self.gate_proj = nn.Linear(hidden, inter, bias=False)
        self.up_proj = nn.Linear(hidden, inter, bias=False)
        self.down_proj = nn.Linear(inter, hidden, bias=False)
        self.act_fn = ACT2FN[config.hidden_act]
        dims = {"gate_proj": (hidden, inter), "up_proj": (hidden, inter)}
        dims["down_proj"] = (inter, hidden)
        self.experts = nn.ModuleList(
            nn.ModuleDict({p: LowRank(r, *dims[p]) for p, r in sorted(er.items()) if r > 0})
            for er in ranks
        )
        self.logits_hook: Callable[[torch.Tensor], torch.Tensor] | None = None
        self.output_hook: Callable[[torch.Tensor], torch.Tensor] | None = None

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(top-k weights [T, k] in x's dtype, top-k expert indices [T, k])."""
        logits = F.linear(x, self.gate.weight) + self.gate.bias.to(x.dtype)
        if self.logits_hook is not None:
            logits = self.logits_hook(logits)
        probs = torch.softmax(logits, dtype=torch.float, dim=-1)
        top_w, top_i = torch.topk(probs, self.top_k, dim=-1)
        if self.norm_topk_prob:
            top_w = top_w / top_w.sum(dim=-1, keepdim=True)
        return top_w.to(x.dtype), top_i

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, shape[-1])
        top_w, top_i = self.route(x)
        base_gate, base_up = self.gate_proj(x), self.up_proj(x)
        mixed = torch.zeros_like(base_gate)  # sum_e w_e h_e, for the shared W_d
        out = torch.zeros_like(x)  # sum_e w_e s_d B_d A_d h_e
        for e in torch.unique(top_i).tolist():
            tok, slot = torch.where(top_i == e)
            deltas = self.experts[e]
            xe = x[tok]
            g, u = base_gate[tok], base_up[tok]
            if "gate_proj" in deltas:
                g = g + deltas["gate_proj"](xe)
            if "up_proj" in deltas:
                u = u + deltas["up_proj"](xe)
            h = self.act_fn(g) * u
            w = top_w[tok, slot, None]
            mixed.index_add_(0, tok, h * w)
            if "down_proj" in deltas:
                out.index_add_(0, tok, deltas["down_proj"](h) * w)
        out = out + self.down_proj(mixed)
        if self.output_hook is not None:
            out = self.output_hook(out)
        return out.reshape(shape)


def moe_layer_ranks(config: Any) -> dict[int, list[dict[str, int]]]:
    """MoE layer index -> per-expert ranks, from a config (this class's or vLLM's copy of it)."""
    layers = list(config.moe_layers or [])
    ranks = list(config.lora_ranks or [])
    if len(layers) != len(ranks) or any(len(r) != config.num_experts for r in ranks):
        raise ValueError("config: lora_ranks must hold one entry per expert for each moe_layer")
    return dict(zip(layers, ranks, strict=True))


class ComposerLoraMoeForCausalLM(LlamaForCausalLM):
    """Llama with LoraMoeBlock in place of the MLP of every layer in `config.moe_layers`."""

    config_class = ComposerLoraMoeConfig
    config: ComposerLoraMoeConfig

    def __init__(self, config: ComposerLoraMoeConfig):
        super().__init__(config)
        for i, ranks in moe_layer_ranks(config).items():
            self.model.layers[i].mlp = LoraMoeBlock(config, ranks)
        self.post_init()

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, LowRank):  # checkpoints always carry them; keep a no-op default
            module.lora_A.zero_()
            module.lora_B.zero_()
            module.scale.fill_(1.0)
            return
        super()._init_weights(module)
