"""`lora: shared`: layout and tensors of a ComposerLoraMoeForCausalLM build (models/lora_moe.py).

Instead of one dense FFN per expert (the materialised recipe), each MoE layer stores the public
FFN once, the router (weight and bias: the bias lives in the checkpoint, so plain transformers
computes what a materialised build computes with its router bias file) and every LoRA expert's
factors. Dense layers keep the base FFN under its Llama names. Streamed like recipe.py.
"""

from __future__ import annotations

from typing import Any

import torch

from composer.adapter_checkpoint import AdapterCheckpoint
from composer.checkpoint import Checkpoint
from composer.compose.arch import PROJS, dense_ffn_key
from composer.compose.plan import Plan
from composer.compose.recipe import Recipe, SourceJob, out_dtype, shared_keys
from composer.writer import TensorSpec


def _expert_key(layer: int, expert: int, proj: str, part: str) -> str:
    return f"model.layers.{layer}.mlp.experts.{expert}.{proj}_proj.{part}"


def lora_ranks(plan: Plan, experts: list[AdapterCheckpoint]) -> list[list[dict[str, int]]]:
    """config.lora_ranks: per MoE layer, per output expert (the public one has none), proj ->
    rank of the factors stored for it."""
    out = []
    for i in plan.moe_layers:
        row: list[dict[str, int]] = [{}]  # expert 0: the public FFN itself
        for ex in experts:
            ranks = {}
            for p in PROJS:
                f = ex.factors.get(dense_ffn_key(i, p))
                if f is not None:
                    ranks[f"{p}_proj"] = f.rank
            row.append(ranks)
        out.append(row)
    return out


def config_extra(plan: Plan, experts: list[AdapterCheckpoint]) -> dict[str, Any]:
    return {"moe_layers": list(plan.moe_layers), "lora_ranks": lora_ranks(plan, experts)}


def build_shared_recipe(
    plan: Plan,
    base: Checkpoint,
    experts: list[AdapterCheckpoint],
    routers: dict[int, torch.Tensor],
    router_bias: dict[int, torch.Tensor],
) -> Recipe:
    dtype = out_dtype(plan)
    n_exp = plan.num_experts
    hidden = int(plan.base_config["hidden_size"])
    glob, per_layer = shared_keys(base)
    ranks = dict(zip(plan.moe_layers, lora_ranks(plan, experts), strict=True))

    def spec_of(name: str) -> TensorSpec:
        return TensorSpec(name, base.meta(name)[1], dtype)

    groups: list[list[TensorSpec]] = [[spec_of(k) for k in glob]]
    for i in range(base.num_layers):
        g = [spec_of(k) for k in per_layer[i]]
        g += [spec_of(dense_ffn_key(i, p)) for p in PROJS]
        if i in ranks:
            g.append(TensorSpec(f"model.layers.{i}.mlp.gate.weight", (n_exp, hidden), dtype))
            g.append(TensorSpec(f"model.layers.{i}.mlp.gate.bias", (n_exp,), dtype))
            for e, ex in enumerate(experts, start=1):
                for p in PROJS:
                    f = ex.factors.get(dense_ffn_key(i, p))
                    if f is None:
                        continue
                    g.append(TensorSpec(_expert_key(i, e, p, "lora_A"), tuple(f.a.shape), dtype))
                    g.append(TensorSpec(_expert_key(i, e, p, "lora_B"), tuple(f.b.shape), dtype))
                    g.append(TensorSpec(_expert_key(i, e, p, "scale"), (), dtype))
        groups.append(g)

    b_path = str(base.path)
    jobs: list[SourceJob] = []
    outputs: list[tuple[str, int]] = []

    def add(name: str, job: SourceJob) -> None:
        jobs.append(job)
        outputs.append((name, len(jobs) - 1))

    def from_base(name: str) -> None:
        add(name, SourceJob(name, (b_path,), dtype))

    def value(name: str, t: torch.Tensor) -> None:  # routers and factors: small, made here
        add(name, SourceJob(name, (), dtype, value=t))

    for k in glob:
        from_base(k)
    for i in range(base.num_layers):
        for k in per_layer[i]:
            from_base(k)
        for p in PROJS:
            from_base(dense_ffn_key(i, p))
        if i not in ranks:
            continue
        value(f"model.layers.{i}.mlp.gate.weight", routers[i])
        value(
            f"model.layers.{i}.mlp.gate.bias",
            router_bias.get(i, torch.zeros(n_exp)).float().reshape(n_exp),
        )
        for e, ex in enumerate(experts, start=1):
            for p in PROJS:
                f = ex.factors.get(dense_ffn_key(i, p))
                if f is None:
                    continue
                value(_expert_key(i, e, p, "lora_A"), f.a.contiguous())
                value(_expert_key(i, e, p, "lora_B"), f.b.contiguous())
                # float64 in, one rounding to the output dtype (as torch.tensor(scale, dtype))
                value(_expert_key(i, e, p, "scale"), torch.tensor(f.scale, dtype=torch.float64))

    return Recipe(groups=groups, jobs=jobs, outputs=outputs, routers=routers, router_bias={})
