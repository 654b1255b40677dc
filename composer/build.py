"""Execute a plan: verify inputs, compute routers, stream shards into a temporary folder beside
the output, then rename it into place. Any error or Ctrl-C removes the temporary folder."""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from composer.arch import moe_config
from composer.checkpoint import Checkpoint
from composer.inputs import ResolvedInput, Resolver
from composer.manifest import manifest, write_manifest
from composer.plan import Plan, make_plan
from composer.recipe import build_recipe, out_dtype, verify_anchors, verify_shapes
from composer.routers import compute_routers
from composer.spec import Spec
from composer.writer import (
    TOKENIZER_FILES,
    ShardWriter,
    atomic_dir,
    new_output_path,
    overwrite_tensors,
    partition,
    peak_rss,
    write_small,
)
from registry.composition import COMPOSITION_FILE
from router_train.bias_file import (
    ROUTER_FILE,
    ROUTER_FILE_CONFIG_KEY,
    ROUTER_FILE_META,
    router_bias_key,
)

MERGE_METHODS = ("merge", "moe_merge")  # built by composer.merging


@dataclass
class BuildResult:
    out_dir: Path
    spec_sha256: str
    files: dict[str, str]  # output file name -> sha256
    wall_s: float
    peak_rss_bytes: int
    inputs: list[ResolvedInput] = field(default_factory=list)
    plan: Plan | None = None


def plan_for(spec: Spec, resolver: Resolver) -> Any:
    """The plan of any spec: a Plan for upcycle/compose, a MergePlan for merge/moe_merge."""
    if spec.method in MERGE_METHODS:
        from composer.merging import plan_merge

        return plan_merge(spec, resolver)
    return make_plan(spec, resolver)


def _bar(total: int, desc: str, enabled: bool, unit: str = "tensor") -> Any:
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit=unit, disable=not enabled or total == 0, leave=False)


def build(
    spec: Spec,
    out_dir: str | Path,
    resolver: Resolver,
    *,
    seed: int | None = None,
    progress: bool = True,
) -> BuildResult:
    """Build ``spec`` into ``out_dir`` (which must not exist) atomically."""
    if spec.method in MERGE_METHODS:
        from composer.merging import build_merge  # imports this module: import late

        return build_merge(spec, out_dir, resolver, seed=seed, progress=progress)
    t0 = time.perf_counter()
    out = new_output_path(out_dir)
    plan = make_plan(spec, resolver)
    seed = spec.seed if seed is None else seed
    opened: list[Checkpoint] = []
    try:
        with atomic_dir(out) as tmp:
            opened.append(Checkpoint(plan.base.path))
            opened += [Checkpoint(e.path) for e in plan.experts]
            files = _execute(plan, opened[0], opened[1:], tmp, seed, progress)
    finally:
        for ck in opened:
            ck.close()
    return BuildResult(
        out_dir=out,
        spec_sha256=spec.sha256(),
        files=files,
        wall_s=time.perf_counter() - t0,
        peak_rss_bytes=peak_rss(),
        inputs=[plan.base, *plan.experts],
        plan=plan,
    )


def _execute(
    plan: Plan, base: Checkpoint, experts: list[Checkpoint], tmp: Path, seed: int, progress: bool
) -> dict[str, str]:
    named = dict(zip((e.name for e in plan.experts), experts, strict=True))
    check = verify_anchors if plan.method == "compose/flexolmo" else verify_shapes
    with _bar(len(named), "verify experts", progress, "expert") as bar:
        for name, ck in named.items():
            check(base, {name: ck})
            bar.update(1)
    with _bar(len(plan.moe_layers), f"router ({plan.router_init})", progress, "layer") as bar:
        routers, bias = compute_routers(plan, base, experts, seed)
        bar.update(len(plan.moe_layers))
    recipe = build_recipe(plan, base, experts, routers, bias)

    writer = ShardWriter(tmp, partition(recipe.groups, plan.max_shard_bytes))
    n_tensors = sum(len(g) for g in recipe.groups)
    with _bar(n_tensors, f"write {plan.arch.architecture}", progress) as bar:
        for name, tensor in recipe.produce():
            writer.write(name, tensor)
            bar.update(1)
    files = writer.close()

    extras: dict[str, str] = {}
    if recipe.router_bias:
        extras[ROUTER_FILE] = _write_router_bias(tmp, recipe.router_bias)
    config = moe_config(
        plan.base_config,
        plan.arch,
        num_experts=plan.num_experts,
        top_k=plan.top_k,
        norm_topk_prob=plan.norm_topk_prob,
        expert_names=plan.expert_names,
        dense_layers=plan.dense_layers,
        dtype=plan.dtype,
        extra={ROUTER_FILE_CONFIG_KEY: ROUTER_FILE} if recipe.router_bias else None,
    )
    (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    for name in TOKENIZER_FILES:
        src = plan.base.path / name
        if src.is_file():
            shutil.copyfile(src, tmp / name)
    tuning = _tune(plan, tmp, seed, progress, files, extras) if plan.spec.router.tune else None
    write_manifest(tmp / COMPOSITION_FILE, manifest(plan, seed, files, extras, tuning))
    return {**files, **extras}


def _tune(
    plan: Plan, tmp: Path, seed: int, progress: bool, files: dict[str, str], extras: dict[str, str]
) -> dict[str, Any]:
    """router.tune on the checkpoint written in ``tmp``; the tuned rows go back into their shards
    and the bias file is rewritten (``files`` / ``extras`` get the new hashes)."""
    from composer.train.router_tune import tune_checkpoint

    cfg = plan.spec.router.tune
    assert cfg is not None
    tuned = tune_checkpoint(tmp, plan.moe_layers, plan.proxy, cfg, seed, progress, out_dtype(plan))
    rows = {plan.arch.router_key(i): row for i, row in tuned.rows.items()}
    files.update(overwrite_tensors(tmp, rows))
    if tuned.bias:
        extras[ROUTER_FILE] = _write_router_bias(tmp, tuned.bias)
    return tuned.record(plan.proxy, cfg.loss_sequences)


def _write_router_bias(folder: Path, bias: dict[int, torch.Tensor]) -> str:
    """composer_router.safetensors (layer -> bias [E], float32, in the given layer order)."""
    tensors = {router_bias_key(i): b.float().contiguous() for i, b in bias.items()}
    return write_small(folder / ROUTER_FILE, tensors, ROUTER_FILE_META)
