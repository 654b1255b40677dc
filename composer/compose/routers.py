"""Router weights for every MoE layer of a plan (the only step that may run the base model)."""

from __future__ import annotations

import torch

from composer.calibration import mlp_inputs
from composer.checkpoint import Checkpoint, SafetensorsFile
from composer.compose.plan import Plan
from composer.compose.recipe import expert_router_rows
from composer.errors import PlanError
from composer.text import read_texts
from router_train.init import gating_logit_normalise, hidden_mean_router, random_router, stack_rows


def _given(plan: Plan, hidden: int) -> tuple[dict[int, torch.Tensor], dict[int, torch.Tensor]]:
    path = plan.spec.resolve_path(plan.spec.router.weights or "")
    where = plan.spec.where("router", "weights")
    f = SafetensorsFile(path)
    try:
        rows: dict[int, torch.Tensor] = {}
        bias: dict[int, torch.Tensor] = {}
        for i in plan.moe_layers:
            k = f"model.layers.{i}.router"
            if k not in f.entries:
                raise PlanError(f"{where}: {path} has no tensor {k}")
            w = f.read(k).float()
            if tuple(w.shape) != (plan.num_experts, hidden):
                raise PlanError(
                    f"{where}: {k} has shape {tuple(w.shape)}, expected "
                    f"({plan.num_experts}, {hidden})"
                )
            rows[i] = w
            if f"model.layers.{i}.router_bias" in f.entries:
                bias[i] = f.read(f"model.layers.{i}.router_bias").float()
        return rows, bias
    finally:
        f.close()


def compute_routers(
    plan: Plan, base: Checkpoint, experts: list[Checkpoint], seed: int
) -> tuple[dict[int, torch.Tensor], dict[int, torch.Tensor]]:
    """(router weight [E, hidden] per MoE layer, router bias [E] per layer where any exists)."""
    spec, layers = plan.spec, plan.moe_layers
    hidden = int(plan.base_config["hidden_size"])
    n = plan.num_experts
    max_tok = spec.router.max_calibration_tokens
    cal_sets = [
        read_texts([spec.resolve_path(p) for p in s]) for s in spec.router.calibration or []
    ]
    cal: list[dict[int, torch.Tensor]] = []
    if cal_sets and layers:
        cal = mlp_inputs(base.path, cal_sets, layers, max_tok)

    routers: dict[int, torch.Tensor] = {}
    bias: dict[int, torch.Tensor] = {}
    init = plan.router_init
    if init == "random":
        gen = torch.Generator().manual_seed(seed)
        std = float(plan.base_config.get("initializer_range", 0.02))
        routers = {i: random_router(n, hidden, gen, std) for i in layers}
    elif init == "hidden_mean":
        routers = {i: hidden_mean_router([c[i] for c in cal]) for i in layers}
    elif init == "given":
        routers, bias = _given(plan, hidden)
    else:  # flexolmo: domain_embedding / trained rows carried by the experts
        public: dict[int, torch.Tensor] = {}
        if spec.router.public_calibration and layers:
            texts = read_texts([spec.resolve_path(p) for p in spec.router.public_calibration])
            (pub,) = mlp_inputs(base.path, [texts], layers, max_tok)
            public = {i: pub[i].mean(dim=0) for i in layers}
        per_expert = [
            expert_router_rows(ck, name, layers, init)
            for ck, name in zip(experts, plan.expert_names[1:], strict=True)
        ]
        for i in layers:
            routers[i] = stack_rows([public.get(i), *(r[i] for r, _ in per_expert)], hidden)
        if spec.router.expert_bias and any(b for _, b in per_expert):
            for i in layers:
                zero = torch.zeros(())
                bias[i] = torch.stack([zero, *(b.get(i, zero) for _, b in per_expert)])
    if spec.router.gating_logit_norm is not None and cal:
        lam = spec.router.gating_logit_norm
        for i in layers:
            tokens = torch.cat([c[i] for c in cal])
            routers[i] = gating_logit_normalise(routers[i], tokens, lam)
    return routers, bias
