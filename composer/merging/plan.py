"""Plans of ``method: merge`` (one dense model from experts) and ``method: moe_merge`` (an MoE
with fewer experts): parameters, inputs, consent, architectures, tensor headers and calibration
files, all checked before any weight is read. docs/merging.md documents the spec fields.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from composer.adapter_checkpoint import Adapter, AdapterCheckpoint
from composer.checkpoint import Checkpoint
from composer.errors import PlanError, located
from composer.inputs import ResolvedInput, Resolver
from composer.merging.lora_output import plan_lora_output
from composer.merging.params import (
    MergeSettings,
    MoeMergeSettings,
    param_where,
    parse_merge_parameters,
    parse_moe_merge_parameters,
    spec_error,
)
from composer.plan import Step, check_consent, render, resolve_inputs
from composer.spec import Spec, SpecError, parse_size
from registry.errors import CheckpointError
from router_train.bias_file import ROUTER_FILE_CONFIG_KEY

_ARCH_KEYS = ("model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "vocab_size")
_DTYPES = ("float32", "bfloat16", "float16")


@dataclass
class MergePlan:
    spec: Spec
    method: str  # "merge/<algorithm>" or "moe_merge/<algorithm>"
    base: ResolvedInput
    experts: list[ResolvedInput]
    settings: MergeSettings | MoeMergeSettings
    base_config: dict[str, Any]
    dtype: str
    max_shard_bytes: int
    steps: list[Step] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def algorithm(self) -> str:
        return self.settings.method

    def __str__(self) -> str:
        params = self.settings.params.model_dump(mode="json", by_alias=True, exclude_none=True)
        rows = [
            ("method", self.method),
            ("output", self._output()),
            ("base", _describe(self.base)),
        ]
        rows += [(f"expert {i}", _describe(e)) for i, e in enumerate(self.experts)]
        rows += [("parameters", json.dumps(params, sort_keys=True)), ("dtype", self.dtype)]
        cal = self.settings.calibration
        if cal:
            n = sum(len(c) for c in cal) if isinstance(cal[0], list) else len(cal)
            rows.append(("calibration", f"{n} file{'s' if n != 1 else ''}"))
        return render(rows, self.steps, self.notes)

    def _output(self) -> str:
        if self.spec.output.format == "lora":
            return "a PEFT LoRA adapter of the base"
        arch = (self.base_config.get("architectures") or ["?"])[0]
        if isinstance(self.settings, MoeMergeSettings):
            before = self.base_config.get("num_local_experts")
            return f"{arch}, {before} -> {self.settings.params.num_experts} experts"
        return f"{arch} (dense, the base's architecture)"


def _describe(r: ResolvedInput) -> str:
    parts = [r.name, r.ref if r.ref == str(r.path) else f"{r.ref} -> {r.path}"]
    parts += [x for x in (r.owner and f"owner {r.owner}", r.policy) if x]
    return ", ".join(parts)


# ------------------------------------------------------------------------------------ planning


def plan_merge(spec: Spec, resolver: Resolver) -> MergePlan:
    """Validate parameters, resolve inputs, check consent, architectures, tensor headers and
    calibration files: everything that needs no weights read."""
    if spec.method == "merge":
        settings: MergeSettings | MoeMergeSettings = _merge_settings(spec)
    elif spec.method == "moe_merge":
        settings = _moe_settings(spec)
    else:
        raise PlanError(f"method {spec.method!r} is not a merge")
    p = settings.params
    if "seed" in type(p).model_fields and "seed" not in (spec.parameters or {}):
        settings.params = p.model_copy(update={"seed": spec.seed})  # the build may override
    base, experts = resolve_inputs(spec, resolver)
    check_consent(spec, base, experts)
    names = [e.name for e in experts]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise PlanError(
            f"{spec.where('experts')}: duplicate expert names {dup}; give each a 'name'"
        )
    base_config = json.loads((base.path / "config.json").read_text())
    dtype = spec.output.dtype
    if dtype == "auto":
        dtype = str(base_config.get("dtype") or base_config.get("torch_dtype") or "float32")
    if dtype not in _DTYPES:
        raise PlanError(f"{spec.where('output', 'dtype')}: unsupported dtype {dtype!r}")
    for loc, file in _calibration_files(settings):
        if not file.is_file():
            where = param_where(spec, ("calibration", *loc))
            raise PlanError(f"{where}: file {file} does not exist")
    plan = MergePlan(
        spec=spec,
        method=f"{spec.method}/{'lora/' if spec.output.format == 'lora' else ''}{settings.method}",
        base=base,
        experts=experts,
        settings=settings,
        base_config=base_config,
        dtype=dtype,
        max_shard_bytes=parse_size(spec.output.max_shard_size),
    )
    if spec.output.format == "lora":
        plan_lora_output(plan)
    elif isinstance(settings, MergeSettings):
        _plan_dense(plan)
    else:
        _plan_moe(plan)
    return plan


def _merge_settings(spec: Spec) -> MergeSettings:
    if not spec.experts:
        raise SpecError(
            spec.source, spec.line("experts"), "experts", "method 'merge' needs at least one expert"
        )
    return parse_merge_parameters(spec)


def _moe_settings(spec: Spec) -> MoeMergeSettings:
    if spec.experts:
        raise SpecError(
            spec.source,
            spec.line("experts"),
            "experts",
            "method 'moe_merge' merges the experts of the base",
        )
    return parse_moe_merge_parameters(spec)


def _calibration_files(
    settings: MergeSettings | MoeMergeSettings,
) -> list[tuple[tuple[int, ...], Path]]:
    """(index under parameters.calibration, file) of every calibration file."""
    cal = settings.calibration or []
    if isinstance(settings, MergeSettings):  # one file list per expert
        return [((i, j), f) for i, files in enumerate(cal) for j, f in enumerate(files)]
    return [((j,), f) for j, f in enumerate(cal)]


def _plan_dense(plan: MergePlan) -> None:
    spec = plan.spec
    for i, e in enumerate(plan.experts):
        where = spec.where("experts", i)
        if e.kind not in ("dense", "ffn", "base", "lora"):
            raise PlanError(
                f"{where}: expert '{e.name}': kind {e.kind!r} cannot be merged (dense, ffn or lora)"
            )
        if e.kind == "lora":
            continue  # checked against the base's tensors below
        cfg = json.loads((e.path / "config.json").read_text())
        for k in _ARCH_KEYS:
            if cfg.get(k) != plan.base_config.get(k):
                raise PlanError(
                    f"{where}: expert '{e.name}': {k} is {cfg.get(k)!r}, the base has "
                    f"{plan.base_config.get(k)!r}"
                )
    try:
        with open_inputs(plan) as (base, experts):
            for i, (e, ck) in enumerate(zip(plan.experts, experts, strict=True)):
                try:
                    if isinstance(ck, AdapterCheckpoint):
                        ck.adapter.check_fits(base)
                        continue
                    check_expert_tensors(base, [ck], [e.name])
                except PlanError as exc:
                    raise located(exc, spec.where("experts", i)) from None
    except CheckpointError as exc:
        raise PlanError(str(exc)) from None
    s = plan.settings
    n = len(plan.experts)
    plan.steps.append(Step("resolve", f"{1 + n} inputs, consent checked"))
    plan.steps.append(Step("verify", "experts have the base's tensor names, shapes and dtypes"))
    if any(e.kind == "lora" for e in plan.experts):
        plan.notes.append(
            "LoRA experts enter as base + scale * B @ A (their task vector; zero on the weights "
            "they do not adapt)"
        )
    if isinstance(s, MergeSettings) and s.calibrated:
        t = s.tokens
        plan.steps.append(
            Step(
                "calibrate",
                f"up to {t.max_calibration_tokens} tokens per expert in chunks of {t.seq_len}; "
                "expert targets from one forward pass each",
            )
        )
        plan.steps.append(Step("learn", f"{s.method} coefficients (weights frozen)"))
        plan.notes.append("calibrated merges hold the base and every expert in memory")
    else:
        plan.steps.append(
            Step("merge", f"{plan.algorithm}, streamed in blocks of rows, two tensors at a time")
        )
    plan.steps.append(Step("write", f"shards (<= {plan.spec.output.max_shard_size} each)"))
    plan.steps.append(Step("finish", "config.json, tokenizer files, composition.json, rename"))


def _plan_moe(plan: MergePlan) -> None:
    cfg = plan.base_config
    s = plan.settings
    assert isinstance(s, MoeMergeSettings)
    if cfg.get("model_type") != "mixtral":
        raise PlanError(
            f"{plan.spec.where('base')}: moe_merge needs a Mixtral checkpoint, got model_type "
            f"{cfg.get('model_type')!r}"
        )
    if cfg.get(ROUTER_FILE_CONFIG_KEY):
        raise PlanError(
            f"{plan.spec.where('base')}: moe_merge cannot carry a per-expert router bias file "
            f"({cfg[ROUTER_FILE_CONFIG_KEY]}) through a merge"
        )
    have, top_k = int(cfg["num_local_experts"]), int(cfg["num_experts_per_tok"])
    want = s.params.num_experts
    if not top_k <= want <= have:
        raise spec_error(
            plan.spec,
            ("num_experts",),
            f"is {want}; it must lie in [{top_k}, {have}] (num_experts_per_tok, the base's "
            "experts)",
        )
    plan.steps.append(Step("resolve", "base, consent checked"))
    if s.method == "m_smoe":
        plan.steps.append(Step("calibrate", "routing statistics of the base on calibration text"))
    detail = f"{s.method}: {have} -> {want} experts per layer"
    if getattr(s.params, "compress", None) is not None:
        detail += ", low-rank + sparse compression"
    plan.steps.append(Step("merge", detail))
    plan.steps.append(Step("write", f"shards (<= {plan.spec.output.max_shard_size} each)"))
    plan.steps.append(Step("finish", "config.json, tokenizer files, composition.json, rename"))
    plan.notes.append(
        "moe_merge streams: one decoder layer at a time for routing statistics, then one MoE "
        "block at a time"
    )


def check_expert_tensors(base: Checkpoint, experts: Sequence[Checkpoint], names: list[str]) -> None:
    """Every expert has exactly the base's tensors with the same shape and dtype (headers only);
    PlanError names the expert and the tensor."""
    ref = set(base.keys())
    for name, ck in zip(names, experts, strict=True):
        keys = set(ck.keys())
        if ref - keys:
            raise PlanError(f"expert '{name}' lacks tensor {sorted(ref - keys)[0]} of the base")
        if keys - ref:
            raise PlanError(f"expert '{name}' has tensor {sorted(keys - ref)[0]} the base lacks")
        for k in sorted(ref):
            (bd, bs), (ed, es) = base.meta(k), ck.meta(k)
            if es != bs:
                raise PlanError(
                    f"expert '{name}': tensor {k} has shape {list(es)}, the base has {list(bs)}"
                )
            if ed != bd:
                raise PlanError(f"expert '{name}': tensor {k} has dtype {ed}, the base has {bd}")


@contextmanager
def open_inputs(plan: MergePlan) -> Iterator[tuple[Checkpoint, list[Any]]]:
    """The plan's base and experts opened (a LoRA expert as an AdapterCheckpoint: base +
    delta); all closed on exit, also when one fails to open."""
    cks: list[Any] = []
    try:
        cks.append(Checkpoint(plan.base.path))
        for e in plan.experts:
            if e.kind == "lora":
                cks.append(AdapterCheckpoint(cks[0], Adapter(e.path)))
            else:
                cks.append(Checkpoint(e.path))
        yield cks[0], cks[1:]
    finally:
        for ck in cks:
            ck.close()
