"""``output.format: lora``: merge LoRA experts into one PEFT adapter instead of a checkpoint.

The combination (PEFT's add_weighted_adapter names and meanings) runs one adapted weight at a
time per worker (merge.lora_combine): only that weight's factors of every input are read, and
DARE's draws come from a generator seeded by (seed, weight name), so the result does not depend
on the order the weights are visited. The output is adapter_config.json +
adapter_model.safetensors, which PeftModel.from_pretrained loads on the base; the lifecycle adds
the tokenizer and composition.json as for every build, but no config.json (the folder is an
adapter, not a model).
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from composer.adapter_checkpoint import Adapter
from composer.checkpoint import DTYPE_NAMES, TORCH_DTYPES, Checkpoint
from composer.errors import PlanError
from composer.merging.params import param_where
from composer.merging.streaming import WORKERS, torch_threads
from composer.plan import Step
from composer.progress import bar
from merge.errors import MergeError
from merge.lora import PEFT_PREFIX
from merge.lora_combine import LoraCombineParams, combine, output_rank
from merge.task_vectors import tensor_generator
from registry.checkpoint import ADAPTER_CONFIG, ADAPTER_WEIGHTS
from registry.store import file_sha256

# composer.merging.plan imports this module, so its MergePlan is written ``Any`` here (a
# type-only import back would be an import circle, which tests/test_architecture.py refuses).
MergePlan = Any

_DTYPE_BY_NAME = {v: k for k, v in TORCH_DTYPES.items()}


def plan_lora_output(plan: MergePlan) -> None:
    """Every expert is a LoRA adapter of the base (headers only); the output rank is known."""
    spec = plan.spec
    adapters: list[Adapter] = []
    try:
        for i, e in enumerate(plan.experts):
            if e.kind != "lora":
                raise PlanError(
                    f"{spec.where('experts', i)}: expert '{e.name}' is kind {e.kind!r}; "
                    "output.format lora merges LoRA adapters only (a dense output takes both)"
                )
            adapters.append(Adapter(e.path))
        base = Checkpoint(plan.base.path)
        try:
            for i, a in enumerate(adapters):
                try:
                    a.check_fits(base)
                except PlanError as exc:
                    raise PlanError(f"{spec.where('experts', i)}: {exc}") from None
        finally:
            base.close()
        p = plan.settings.params
        assert isinstance(p, LoraCombineParams)
        try:
            rank = output_rank(p.combination, [a.rank for a in adapters], p.rank)
        except MergeError as exc:
            raise PlanError(f"{param_where(spec, ('combination',))}: {exc}") from None
        dtype = _adapter_dtype(adapters[0]) if spec.output.dtype == "auto" else spec.output.dtype
    finally:
        for a in adapters:
            a.close()
    plan.dtype = dtype
    n = len(plan.experts)
    plan.steps.append(Step("resolve", f"{1 + n} inputs, consent checked"))
    plan.steps.append(Step("verify", "every adapted weight exists in the base with its shape"))
    plan.steps.append(
        Step("merge", f"{p.combination} of {n} adapters, one weight at a time -> rank {rank}")
    )
    plan.steps.append(Step("write", f"{ADAPTER_CONFIG}, {ADAPTER_WEIGHTS}"))
    plan.steps.append(Step("finish", "tokenizer files, composition.json, rename"))


def _adapter_dtype(adapter: Adapter) -> str:
    first = adapter.weights[0]
    dtype, _ = adapter.file.meta(adapter.keys[first]["A"])
    return _DTYPE_BY_NAME.get(dtype, "float32")


def run_lora_output(
    plan: MergePlan, params: LoraCombineParams, tmp: Path, progress: bool
) -> tuple[dict[str, str], dict[str, Any]]:
    """Write the merged adapter into ``tmp``; returns (files, results for composition.json)."""
    adapters = [Adapter(e.path) for e in plan.experts]
    try:
        weights = params.weights or [1.0] * len(adapters)
        rank = output_rank(params.combination, [a.rank for a in adapters], params.rank)
        names = sorted(set().union(*(a.weights for a in adapters)))
        dtype = TORCH_DTYPES[plan.dtype]

        def merge_one(w: str) -> tuple[torch.Tensor, torch.Tensor]:
            a, b = combine(
                [ad.factor(w) for ad in adapters],
                weights,
                params.combination,
                rank,
                density=params.density,
                majority_sign_method=params.majority_sign_method,
                generator=tensor_generator(params.seed, w),
                name=w,
            )
            return a.to(dtype).contiguous(), b.to(dtype).contiguous()

        tensors: dict[str, torch.Tensor] = {}
        # Weights are independent (DARE's draws are seeded per weight): one worker per core,
        # each on one torch thread (an SVD on two contending threads ran 17x slower here).
        with (
            torch_threads(1),
            ThreadPoolExecutor(max_workers=WORKERS) as pool,
            bar(len(names), f"merge lora {params.combination}", progress) as progress_bar,
        ):
            for w, (a, b) in zip(names, pool.map(merge_one, names), strict=True):
                module = PEFT_PREFIX + w.removesuffix(".weight")
                tensors[f"{module}.lora_A.weight"] = a
                tensors[f"{module}.lora_B.weight"] = b
                progress_bar.update(1)
        config = merged_config([a.config for a in adapters], rank)
    finally:
        for ad in adapters:
            ad.close()
    save_file(tensors, str(tmp / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    (tmp / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    files = {n: file_sha256(tmp / n) for n in (ADAPTER_CONFIG, ADAPTER_WEIGHTS)}
    results = {
        "rank": rank,
        "adapted_weights": len(names),
        "dtype": DTYPE_NAMES[dtype],
    }
    return files, results


def merged_config(configs: list[dict[str, Any]], rank: int) -> dict[str, Any]:
    """The first input's adapter_config.json with PEFT's changes for a merged adapter: r and
    lora_alpha = rank (scale 1: the scales are in the factors), no rank or alpha patterns, the
    union of the target modules. Unlike PEFT, use_rslora is turned off (PEFT keeps the first
    input's, which would rescale the merged adapter by sqrt(r))."""
    targets = [c.get("target_modules") for c in configs]
    if all(isinstance(t, list) for t in targets):
        merged_targets: Any = sorted(set().union(*targets))  # type: ignore[arg-type]
    elif all(isinstance(t, str) for t in targets):
        merged_targets = "|".join(f"({t})" for t in targets)
    else:
        raise MergeError(
            "adapter_config.json: target_modules mix lists and regular expressions across the "
            "adapters; PEFT cannot merge those either"
        )
    out = dict(configs[0])
    out.update(
        r=rank,
        lora_alpha=rank,
        target_modules=merged_targets,
        alpha_pattern={},
        rank_pattern={},
        use_rslora=False,
    )
    return out
