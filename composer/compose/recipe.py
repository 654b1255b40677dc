"""From a plan to tensors: the output layout and a generator that streams each output tensor.

Every output tensor is one job (composer.tensor_jobs): read from one input, a weighted average of
the experts' (BTX), or a router computed beforehand; an executor runs the jobs here or as Ray
tasks and the writer takes the tensors in layout order, so memory stays near one tensor (plus
the tasks in flight on Ray).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from composer.checkpoint import TORCH_DTYPES, Checkpoint, SafetensorsFile
from composer.compose.arch import PROJS, dense_ffn_key
from composer.compose.plan import Plan
from composer.errors import AnchorMismatchError, PlanError
from composer.tensor_jobs import OpenCheckpoint, TensorExecutor
from composer.writer import TensorSpec
from registry.checkpoint import EXPERT_FILE
from registry.tensor_names import is_ffn, layer_of


@dataclass
class Recipe:
    groups: list[list[TensorSpec]]
    jobs: list[SourceJob]  # in the order their first output is written
    outputs: list[tuple[str, int]]  # (output tensor, index into jobs), in layout order
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


@dataclass(frozen=True)
class SourceJob:
    """How one output tensor is made from the inputs (picklable: names and paths, no weights,
    except a router, which is computed before any job runs)."""

    name: str  # input tensor name
    paths: tuple[str, ...]  # one checkpoint: read it; several: the weighted average
    dtype: torch.dtype
    weights: tuple[float, ...] = ()  # normalised weights of an average
    scale: float = 1.0  # dense layers of FlexOlmo without renormalisation (down_proj)
    value: torch.Tensor | None = None  # a router, already computed


def run_source_job(job: SourceJob, open_checkpoint: OpenCheckpoint) -> torch.Tensor:
    """One output tensor (runs on the driver, or in a Ray task: composer.tensor_jobs)."""
    if job.value is not None:
        t = job.value
    elif not job.weights:
        t = open_checkpoint(job.paths[0]).read(job.name)
    else:
        t = torch.zeros(open_checkpoint(job.paths[0]).meta(job.name)[1], dtype=torch.float32)
        for w, p in zip(job.weights, job.paths, strict=True):
            t.add_(open_checkpoint(p).read(job.name).float(), alpha=w)
    if job.scale != 1.0:
        t = t.float() * job.scale
    return t.to(job.dtype)


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
    b_path, e_paths = str(base.path), tuple(str(ck.path) for ck in experts)

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

    def average(name: str, scale: float = 1.0) -> SourceJob:
        w = tuple(x / total_w for x in weights)
        return SourceJob(name, e_paths, dtype, weights=w, scale=scale)

    def shared(name: str) -> SourceJob:
        return average(name) if btx else SourceJob(name, (b_path,), dtype)

    def expert_ffn(layer: int, e: int, proj: str) -> SourceJob:
        key = dense_ffn_key(layer, proj)
        if plan.method == "upcycle" or (plan.method == "compose/flexolmo" and e == 0):
            return SourceJob(key, (b_path,), dtype)
        return SourceJob(key, (e_paths[e - 1 if plan.method == "compose/flexolmo" else e],), dtype)

    jobs: list[SourceJob] = []
    outputs: list[tuple[str, int]] = []  # output tensor -> index of the job that makes it

    def add(name: str, job: SourceJob) -> int:
        jobs.append(job)
        outputs.append((name, len(jobs) - 1))
        return len(jobs) - 1

    for k in glob:
        add(k, shared(k))
    for i in range(base.num_layers):
        for k in per_layer[i]:
            add(k, shared(k))
        moe = i in routers
        router = routers[i] if moe else torch.zeros(n_exp, hidden)
        add(arch.router_key(i), SourceJob(arch.router_key(i), (), dtype, value=router))
        if moe:
            for e in range(n_exp):
                for p in PROJS:
                    add(arch.expert_key(i, e, p), expert_ffn(i, e, p))
            continue
        # A dense layer: every expert is the same FFN, made once and written E times.
        made: dict[str, int] = {}
        for p in PROJS:
            key, scale = dense_ffn_key(i, p), (dense_scale if p == "down" else 1.0)
            job = average(key, scale) if btx else SourceJob(key, (b_path,), dtype, scale=scale)
            made[p] = add(arch.expert_key(i, 0, p), job)
        for e in range(1, n_exp):
            for p in PROJS:
                outputs.append((arch.expert_key(i, e, p), made[p]))

    return Recipe(
        groups=groups, jobs=jobs, outputs=outputs, routers=routers, router_bias=router_bias
    )


def produce(
    recipe: Recipe, executor: TensorExecutor, inputs: dict[str, Checkpoint]
) -> Iterator[tuple[str, torch.Tensor]]:
    """Every output tensor in layout order, made by ``executor`` (a job's result is kept only
    until its last output is written: the dense layers' FFN, E times)."""
    results = executor.map(run_source_job, recipe.jobs, inputs)
    last_use = {j: n for n, (_, j) in enumerate(recipe.outputs)}
    have: dict[int, torch.Tensor] = {}
    fetched = 0
    for n, (name, j) in enumerate(recipe.outputs):
        while j not in have:
            have[fetched] = next(results)
            fetched += 1
        t = have[j] if last_use[j] > n else have.pop(j)
        yield name, t
