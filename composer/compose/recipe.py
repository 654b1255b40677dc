"""From a plan to tensors: the output layout and a generator that streams each output tensor.

Every output tensor is produced from at most one layer's worth of input tensors and handed to the
writer at once, so memory stays near one layer (BTX averages one tensor at a time).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

from composer.checkpoint import TORCH_DTYPES, Checkpoint, SafetensorsFile
from composer.compose.arch import PROJS, dense_ffn_key
from composer.compose.plan import Plan
from composer.errors import AnchorMismatchError, PlanError
from composer.writer import TensorSpec
from registry.checkpoint import EXPERT_FILE
from registry.tensor_names import is_ffn, layer_of


@dataclass
class Recipe:
    groups: list[list[TensorSpec]]
    produce: Callable[[], Iterator[tuple[str, torch.Tensor]]]
    routers: dict[int, torch.Tensor]  # MoE layer -> [E, hidden] float32
    router_bias: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> [E] float32


def out_dtype(plan: Plan) -> torch.dtype:
    if plan.dtype not in TORCH_DTYPES:
        raise PlanError(f"output.dtype: unsupported dtype {plan.dtype!r}")
    return TORCH_DTYPES[plan.dtype]


def shared_keys(base: Checkpoint) -> tuple[list[str], dict[int, list[str]]]:
    """Non-FFN tensors of the base: (globals, per-layer lists), each in sorted order."""
    glob: list[str] = []
    per_layer: dict[int, list[str]] = {i: [] for i in range(base.num_layers)}
    for k in sorted(base.tensor_names()):
        if is_ffn(k):
            continue
        i = layer_of(k)
        (glob if i is None else per_layer[i]).append(k)
    return glob, per_layer


# ------------------------------------------------------------------------------ verification


def verify_anchors(base: Checkpoint, experts: dict[str, Checkpoint]) -> None:
    """FlexOlmo: every expert's shared weights must be bit-identical to the public model's."""
    glob, per_layer = shared_keys(base)
    order = glob + [k for i in sorted(per_layer) for k in per_layer[i]]
    for name, ck in experts.items():
        extra = sorted(k for k in ck.tensor_names() if not is_ffn(k) and k not in base)
        if extra:
            raise AnchorMismatchError(
                f"expert '{name}' has a shared tensor the public model lacks: {extra[0]}"
            )
        for k in order:
            if k not in ck:
                raise AnchorMismatchError(f"expert '{name}' lacks the shared tensor {k}")
            if not ck.same_bytes(k, base):
                raise AnchorMismatchError(
                    f"expert '{name}' is not anchored to the public model: shared tensor {k} "
                    "differs (FlexOlmo experts must keep every non-FFN weight bit-identical)"
                )


def verify_shapes(base: Checkpoint, experts: dict[str, Checkpoint]) -> None:
    """BTX: experts are fine-tunes of the base, so names, dtypes and shapes must agree."""
    for name, ck in experts.items():
        if set(ck.tensor_names()) != set(base.tensor_names()):
            diff = sorted(set(ck.tensor_names()) ^ set(base.tensor_names()))
            raise PlanError(f"expert '{name}' does not have the base's tensors (first: {diff[0]})")
        for k in base.tensor_names():
            if ck.meta(k)[1] != base.meta(k)[1]:
                raise PlanError(f"expert '{name}': {k} has shape {ck.meta(k)[1]}")


# ------------------------------------------------------------------------------ expert files


def expert_router_rows(
    ck: Checkpoint, name: str, layers: list[int], which: str
) -> tuple[dict[int, torch.Tensor], dict[int, torch.Tensor]]:
    """(rows, biases) per layer from an expert's composer_expert.safetensors."""
    f = SafetensorsFile(ck.path / EXPERT_FILE)
    try:
        key = "domain_embedding" if which == "domain_embedding" else "router_row"
        rows: dict[int, torch.Tensor] = {}
        bias: dict[int, torch.Tensor] = {}
        for i in layers:
            k = f"model.layers.{i}.{key}"
            if k not in f.entries:
                trained = f.metadata.get("layers", "?")
                raise PlanError(
                    f"expert '{name}' has no {key} for MoE layer {i} (trained layers: {trained})"
                )
            rows[i] = f.read(k).float()
            b = f"model.layers.{i}.router_bias"
            if b in f.entries:
                bias[i] = f.read(b).float().reshape(())
        return rows, bias
    finally:
        f.close()


# ------------------------------------------------------------------------------ layout + data


def build_recipe(
    plan: Plan,
    base: Checkpoint,
    experts: list[Checkpoint],
    routers: dict[int, torch.Tensor],
    router_bias: dict[int, torch.Tensor],
) -> Recipe:
    dtype = out_dtype(plan)
    arch = plan.arch
    n_exp = plan.num_experts
    glob, per_layer = shared_keys(base)
    hidden = int(plan.base_config["hidden_size"])
    inter = int(plan.base_config["intermediate_size"])
    ffn_shape = {"gate": (inter, hidden), "up": (inter, hidden), "down": (hidden, inter)}
    weights = [e.weight for e in plan.spec.experts]
    total_w = sum(weights) or 1.0
    btx = plan.method == "compose/btx"
    # FlexOlmo without renormalisation scales identical experts by the sum of the top-k
    # probabilities; with a zero router that sum is exactly top_k / E, so dense layers undo it.
    dense_scale = 1.0 if plan.norm_topk_prob else n_exp / plan.top_k

    def spec_of(name: str) -> TensorSpec:
        return TensorSpec(name, base.meta(name)[1], dtype)

    groups: list[list[TensorSpec]] = [[spec_of(k) for k in glob]]
    for i in range(base.num_layers):
        g = [spec_of(k) for k in per_layer[i]]
        g.append(TensorSpec(arch.router_key(i), (n_exp, hidden), dtype))
        for e in range(n_exp):
            for p in PROJS:
                g.append(TensorSpec(arch.expert_key(i, e, p), ffn_shape[p], dtype))
        groups.append(g)

    def average(name: str) -> torch.Tensor:
        acc = torch.zeros(base.meta(name)[1], dtype=torch.float32)
        for w, ck in zip(weights, experts, strict=True):
            acc.add_(ck.read(name).float(), alpha=w / total_w)
        return acc

    def shared(name: str) -> torch.Tensor:
        return average(name) if btx else base.read(name)

    def expert_ffn(layer: int, e: int, proj: str) -> torch.Tensor:
        key = dense_ffn_key(layer, proj)
        if plan.method == "upcycle":
            return base.read(key)
        if plan.method == "compose/flexolmo":
            return base.read(key) if e == 0 else experts[e - 1].read(key)
        return experts[e].read(key)

    def produce() -> Iterator[tuple[str, torch.Tensor]]:
        for k in glob:
            yield k, shared(k).to(dtype)
        for i in range(base.num_layers):
            for k in per_layer[i]:
                yield k, shared(k).to(dtype)
            moe = i in routers
            router = routers[i] if moe else torch.zeros(n_exp, hidden)
            yield arch.router_key(i), router.to(dtype)
            if moe:
                for e in range(n_exp):
                    for p in PROJS:
                        yield arch.expert_key(i, e, p), expert_ffn(i, e, p).to(dtype)
            else:
                dense = {
                    p: (average(dense_ffn_key(i, p)) if btx else base.read(dense_ffn_key(i, p)))
                    for p in PROJS
                }
                if dense_scale != 1.0:
                    dense["down"] = dense["down"].float() * dense_scale
                dense = {p: t.to(dtype) for p, t in dense.items()}
                for e in range(n_exp):
                    for p in PROJS:
                        yield arch.expert_key(i, e, p), dense[p]

    return Recipe(groups=groups, produce=produce, routers=routers, router_bias=router_bias)
