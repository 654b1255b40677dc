"""Execute a compose-family plan (upcycle, compose/flexolmo, compose/btx) in the build's
temporary folder: verify the experts, compute routers, stream every output tensor into shards,
then config.json, the router bias file and, when asked, router tuning."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from composer.checkpoint import Checkpoint
from composer.compose.arch import moe_config
from composer.compose.lora_inputs import open_expert
from composer.compose.lora_shared import build_shared_recipe, config_extra
from composer.compose.plan import PUBLIC_EXPERT, Plan
from composer.compose.recipe import (
    build_recipe,
    out_dtype,
    produce,
    verify_anchors,
    verify_shapes,
)
from composer.compose.routers import compute_routers
from composer.errors import BuildError
from composer.manifest import input_record, library_versions
from composer.plan import Written
from composer.progress import bar
from composer.tensor_jobs import LocalExecutor, TensorExecutor, inputs_by_path
from composer.writer import ShardWriter, overwrite_tensors, partition, write_small
from registry.composition import COMPOSITION_FORMAT
from router_train.bias_file import (
    ROUTER_FILE,
    ROUTER_FILE_CONFIG_KEY,
    ROUTER_FILE_META,
    router_bias_key,
)


def execute(
    plan: Plan,
    tmp: Path,
    seed: int,
    progress: bool,
    executor: TensorExecutor | None = None,
) -> Written:
    """Write the composed checkpoint into ``tmp`` (the tokenizer files are there already);
    ``executor`` makes the tensors (default: here, in order)."""
    if executor is not None and executor.remote and any(e.kind == "lora" for e in plan.experts):
        # Ray tasks open inputs by path as full checkpoints; an adapter is base + B @ A.
        raise BuildError(
            "--ray: compose with LoRA experts runs on one machine for now "
            f"(expert '{next(e.name for e in plan.experts if e.kind == 'lora')}' is an adapter); "
            "build without --ray"
        )
    opened: list[Any] = []  # Checkpoint, or AdapterCheckpoint over the base
    try:
        opened.append(Checkpoint(plan.base.path))
        opened += [open_expert(e.kind, e.path, opened[0]) for e in plan.experts]
        files, extras, tuning = _write(
            plan, opened[0], opened[1:], tmp, seed, progress, executor or LocalExecutor()
        )
    finally:
        for ck in opened:
            ck.close()
    return Written(files={**files, **extras}, manifest=manifest(plan, seed, files, extras, tuning))


def _write(
    plan: Plan,
    base: Checkpoint,
    experts: list[Checkpoint],
    tmp: Path,
    seed: int,
    progress: bool,
    executor: TensorExecutor,
) -> tuple[dict[str, str], dict[str, str], dict[str, Any] | None]:
    named = dict(zip((e.name for e in plan.experts), experts, strict=True))
    check = verify_anchors if plan.method == "compose/flexolmo" else verify_shapes
    with bar(len(named), "verify experts", progress, "expert") as b:
        for name, ck in named.items():
            check(base, {name: ck})
            b.update(1)
    with bar(len(plan.moe_layers), f"router ({plan.router_init})", progress, "layer") as b:
        routers, bias = compute_routers(plan, base, experts, seed)
        b.update(len(plan.moe_layers))
    shared = plan.lora == "shared"
    if shared:  # plan checked that every expert is an AdapterCheckpoint
        recipe = build_shared_recipe(plan, base, experts, routers, bias)  # type: ignore[arg-type]
    else:
        recipe = build_recipe(plan, base, experts, routers, bias)

    writer = ShardWriter(tmp, partition(recipe.groups, plan.max_shard_bytes))
    n_tensors = sum(len(g) for g in recipe.groups)
    with bar(n_tensors, f"write {plan.arch.architecture}", progress) as b:
        for name, tensor in produce(recipe, executor, inputs_by_path(base, *experts)):
            writer.write(name, tensor)
            b.update(1)
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
        extra=config_extra(plan, experts)  # type: ignore[arg-type]
        if shared
        else ({ROUTER_FILE_CONFIG_KEY: ROUTER_FILE} if recipe.router_bias else None),
    )
    (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    tuning = _tune(plan, tmp, seed, progress, files, extras) if plan.spec.router.tune else None
    return files, extras, tuning


def _tune(
    plan: Plan, tmp: Path, seed: int, progress: bool, files: dict[str, str], extras: dict[str, str]
) -> dict[str, Any]:
    """router.tune on the checkpoint written in ``tmp``; the tuned rows go back into their shards
    and the bias file is rewritten (``files`` / ``extras`` get the new hashes)."""
    from composer.train.router_tune import tune_checkpoint  # transformers: import when tuning

    cfg = plan.spec.router.tune
    assert cfg is not None
    tuned = tune_checkpoint(tmp, plan.moe_layers, plan.proxy, cfg, seed, progress, out_dtype(plan))
    rows = {plan.arch.router_key(i): row for i, row in tuned.rows.items()}
    files.update(overwrite_tensors(tmp, rows))
    if tuned.bias:
        extras[ROUTER_FILE] = _write_router_bias(tmp, tuned.bias)
    return tuned.record(plan.proxy, cfg.loss_sequences)


def _write_router_bias(folder: Path, bias: dict[int, torch.Tensor]) -> str:
    """The router bias file (layer -> bias [E], float32, in the given layer order)."""
    tensors = {router_bias_key(i): b.float().contiguous() for i, b in bias.items()}
    return write_small(folder / ROUTER_FILE, tensors, ROUTER_FILE_META)


def manifest(
    plan: Plan,
    seed: int,
    files: dict[str, str],
    extras: dict[str, str],
    router_tuning: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """composition.json of a compose-family build."""
    experts = []
    for idx, name in enumerate(plan.expert_names):
        if plan.method == "compose/flexolmo":
            src = plan.base if name == PUBLIC_EXPERT and idx == 0 else plan.experts[idx - 1]
        elif plan.method == "compose/btx":
            src = plan.experts[idx]
        else:
            src = plan.base  # upcycled experts are copies of the base FFN
        experts.append({"index": idx, **input_record(src), "name": name, "source": src.name})
    return {
        "format": COMPOSITION_FORMAT,
        "name": plan.spec.name,
        "method": plan.method,
        "architecture": plan.arch.architecture,
        "base": input_record(plan.base),
        "experts": experts,
        "spec": plan.spec.model_dump(mode="json"),
        "spec_sha256": plan.spec.sha256(),
        "parameters": {
            "num_experts": plan.num_experts,
            "top_k": plan.top_k,
            "norm_topk_prob": plan.norm_topk_prob,
            "moe_layers": plan.moe_layers,
            "dense_layers": plan.dense_layers,
            "router_init": plan.router_init,
            "gating_logit_norm": plan.spec.router.gating_logit_norm,
            "dtype": plan.dtype,
            # only with LoRA experts, so other builds' composition.json stay byte-identical
            **({"lora": plan.lora} if any(e.kind == "lora" for e in plan.experts) else {}),
        },
        "router_tuning": router_tuning,
        "seed": seed,
        "versions": library_versions(),
        "files": dict(sorted(files.items())),
        "extras": dict(sorted(extras.items())),
    }
