"""Plans of the compose family (upcycle, compose/flexolmo, compose/btx): a validated spec plus
resolved inputs -> what the build will do, checked up front without reading weights."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from composer.checkpoint import Checkpoint
from composer.compose.arch import LORA_MOE, MIXTRAL, OutputArch, output_arch
from composer.compose.lora_inputs import adapter_targets, check_lora_expert
from composer.errors import PlanError, located
from composer.inputs import ResolvedInput, Resolver
from composer.plan import Step, check_consent, ranges, render, resolve_inputs
from composer.spec import MoeLayersEvery, Spec, SpecError, parse_size
from registry.checkpoint import EXPERT_FILE
from registry.tensor_names import layer_of

PUBLIC_EXPERT = "public"  # name of expert 0 (the public model's FFN) in compose/flexolmo


@dataclass
class Plan:
    spec: Spec
    method: str  # "upcycle" | "compose/flexolmo" | "compose/btx"
    base: ResolvedInput
    experts: list[ResolvedInput]  # expert inputs (empty for upcycle)
    expert_names: list[str]  # experts of the output model, in router order
    arch: OutputArch
    base_config: dict[str, Any]
    moe_layers: list[int]
    dense_layers: list[int]
    top_k: int
    norm_topk_prob: bool
    router_init: str
    dtype: str
    max_shard_bytes: int
    steps: list[Step] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    proxy: dict[str, list[Path]] = field(default_factory=dict)  # router.tune: expert -> files
    lora: str = "materialised"  # LoRA experts: "materialised" or "shared" (docs/adapters.md)

    @property
    def num_experts(self) -> int:
        return len(self.expert_names)

    def __str__(self) -> str:
        rows = [
            ("method", self.method),
            ("output", f"{self.arch.architecture}, {self.num_experts} experts, top-{self.top_k}"),
            ("base", _describe(self.base)),
        ]
        rows += [(f"expert {i}", n) for i, n in enumerate(self.expert_names)]
        rows += [(f"input {e.name}", _describe(e)) for e in self.experts]
        if any(e.kind == "lora" for e in self.experts):
            rows.append(("lora experts", self.lora))
        rows += [
            ("moe layers", ranges(self.moe_layers) or "none"),
            ("dense layers", ranges(self.dense_layers) or "none"),
            ("router", f"{self.router_init}; renormalise top-k: {self.norm_topk_prob}"),
            ("dtype", self.dtype),
        ]
        return render(rows, self.steps, self.notes)


def _describe(r: ResolvedInput) -> str:
    parts = [r.ref if r.ref == str(r.path) else f"{r.ref} -> {r.path}"]
    if r.kind == "lora":
        parts.append("LoRA adapter")
    if r.version:
        parts.append(f"v{r.version}")
    if r.owner:
        parts.append(f"owner {r.owner}")
    if r.policy:
        parts.append(r.policy)
    return ", ".join(parts)


def resolve_moe_layers(spec: Spec, num_layers: int) -> list[int]:
    """The MoE layer indices of ``spec`` for a base of ``num_layers`` layers."""
    ml = spec.moe_layers
    if ml == "all":
        return list(range(num_layers))
    if isinstance(ml, MoeLayersEvery):
        return list(range(ml.offset, num_layers, ml.every))
    bad = [(j, i) for j, i in enumerate(ml) if i >= num_layers]
    if bad:
        j, i = bad[0]
        raise PlanError(
            f"{spec.where('moe_layers', j)}: layer {i} out of range (the base has {num_layers})"
        )
    return sorted(set(ml))


def _check_calibration_files(spec: Spec) -> None:
    """Calibration text must exist and be non-empty (else the router step fails mid-build)."""
    sets = [(("router", "calibration", i), s) for i, s in enumerate(spec.router.calibration or [])]
    if spec.router.public_calibration:
        sets.append((("router", "public_calibration"), spec.router.public_calibration))
    for loc, files in sets:
        if not files:
            raise PlanError(f"{spec.where(*loc)}: names no file")
        where = spec.where(*loc)
        for f in files:
            try:
                path = spec.resolve_path(f)
            except SpecError as e:  # an unset $VAR
                raise located(e, where) from None
            if not path.is_file():
                raise PlanError(f"{where}: {path} does not exist")
            if path.stat().st_size == 0:
                raise PlanError(f"{where}: {path} is empty")


def _proxy_files(spec: Spec, names: list[str], base_dir: Path) -> dict[str, list[Path]]:
    """router.tune.proxy resolved to files; names that are not experts, paths that match no
    file and a base without tokenizer (when the proxy is tokenised with it) are plan errors."""
    from composer.train.data import collect_files

    tune = spec.router.tune
    if tune is None:
        return {}
    out: dict[str, list[Path]] = {}
    for name, paths in tune.proxy.items():
        where = spec.where("router", "tune", "proxy", name)
        if name not in names:
            raise PlanError(
                f"{where}: {name!r} is not an expert of this build; expected one of "
                + ", ".join(names)
            )
        try:
            out[name] = collect_files([spec.resolve_path(p) for p in paths])
        except FileNotFoundError as e:
            raise PlanError(f"{where}: {e}") from None
        except SpecError as e:  # an unset $VAR
            raise PlanError(f"{where}: {e.message}") from None
    if tune.tokenizer == "base" and not any(
        (base_dir / f).is_file() for f in ("tokenizer.json", "tokenizer.model")
    ):
        raise PlanError(
            f"{spec.where('router', 'tune', 'tokenizer')}: the base has no tokenizer files to "
            "tokenise the proxy text with"
        )
    return out


def _upcycle_names(spec: Spec, experts: list[ResolvedInput]) -> list[str]:
    return spec.expert_names or [f"expert{i}" for i in range(spec.num_experts or 0)]


def _flexolmo_names(spec: Spec, experts: list[ResolvedInput]) -> list[str]:
    return [PUBLIC_EXPERT, *(e.name for e in experts)]


def _btx_names(spec: Spec, experts: list[ResolvedInput]) -> list[str]:
    return [e.name for e in experts]


# plan.method -> (the output's expert names in router order, the default router init).
_OUTPUT_EXPERTS: dict[str, tuple[Callable[[Spec, list[ResolvedInput]], list[str]], str]] = {
    "upcycle": (_upcycle_names, "random"),
    "compose/flexolmo": (_flexolmo_names, "domain_embedding"),
    "compose/btx": (_btx_names, "random"),
}


def make_plan(spec: Spec, resolver: Resolver) -> Plan:
    """Resolve inputs and check everything that can be checked without reading weights."""
    base, experts = resolve_inputs(spec, resolver)
    check_consent(spec, base, experts)

    base_config = json.loads((base.path / "config.json").read_text())
    try:
        arch = output_arch(base_config)
    except Exception as e:
        raise PlanError(f"{spec.where('base')}: {e}") from None
    n_layers = int(base_config["num_hidden_layers"])
    moe_layers = resolve_moe_layers(spec, n_layers)
    dense_layers = [i for i in range(n_layers) if i not in moe_layers]
    method = spec.method if spec.method == "upcycle" else f"compose/{spec.style}"
    expert_names, default_init = _OUTPUT_EXPERTS[method]
    names = expert_names(spec, experts)
    if len(set(names)) != len(names):
        raise PlanError(f"{spec.where('experts')}: duplicate expert names {names}")

    # FlexOlmo does not renormalise top-k weights; Mixtral always does.
    default_norm = arch is MIXTRAL or spec.style != "flexolmo"
    norm = spec.norm_topk_prob if spec.norm_topk_prob is not None else default_norm
    if arch is MIXTRAL and not norm:
        raise PlanError(
            f"{spec.where('norm_topk_prob')}: false is not expressible in MixtralForCausalLM, "
            "which always renormalises the top-k weights (Llama/Mistral bases become Mixtral)"
        )
    init = spec.router.init or default_init
    _check_calibration_files(spec)
    proxy = _proxy_files(spec, list(names), base.path)
    if proxy and spec.top_k == 1 and norm:
        raise PlanError(
            f"{spec.where('router', 'tune')}: with top_k 1 and renormalised top-k weights every "
            "token's one expert gets weight 1, so the router gets no gradient; use top_k >= 2"
        )
    _check_experts(spec, experts, base.path, base_config, init)
    if spec.lora_mode == "shared":
        _check_shared(spec, experts, base_config)
        arch = LORA_MOE

    dtype = spec.output.dtype
    if dtype == "auto":
        dtype = str(base_config.get("dtype") or base_config.get("torch_dtype") or "float32")
    plan = Plan(
        spec=spec,
        method=method,
        base=base,
        experts=experts,
        expert_names=list(names),
        arch=arch,
        base_config=base_config,
        moe_layers=moe_layers,
        dense_layers=dense_layers,
        top_k=spec.top_k,
        norm_topk_prob=norm,
        router_init=init,
        dtype=dtype,
        max_shard_bytes=parse_size(spec.output.max_shard_size),
        proxy=proxy,
        lora=spec.lora_mode,
    )
    plan.steps = _steps(plan)
    plan.notes = _notes(plan)
    return plan


def _check_experts(
    spec: Spec,
    experts: list[ResolvedInput],
    base_dir: Path,
    base_config: dict[str, Any],
    init: str,
) -> None:
    """Every expert fits the base and carries what the router init reads."""
    shapes: dict[str, tuple[int, ...]] = {}
    if any(e.kind == "lora" for e in experts):
        base = Checkpoint(base_dir)  # headers only
        shapes = {k: base.meta(k)[1] for k in base.tensor_names()}
        base.close()
    ffn_only = spec.style == "flexolmo" or spec.lora_mode == "shared"
    for i, e in enumerate(experts):
        where = spec.where("experts", i)
        if e.kind == "lora":
            check_lora_expert(e.path, e.name, shapes, ffn_only, where)
        else:
            _check_full_expert(where, e, base_config)
        if init in ("domain_embedding", "trained") and not (e.path / EXPERT_FILE).is_file():
            raise PlanError(
                f"{where}: expert '{e.name}' has no {EXPERT_FILE} (router init "
                f"{init!r} needs its domain embedding / router row)"
            )


def _check_shared(spec: Spec, experts: list[ResolvedInput], base_config: dict[str, Any]) -> None:
    """`lora: shared` stores one base FFN and each expert's factors: only LoRA experts on a
    Llama base in a FlexOlmo composition (the public expert is the base FFN itself)."""
    where = spec.where("lora")
    if spec.style != "flexolmo":
        raise PlanError(
            f"{where}: 'shared' needs style flexolmo (BTX averages the experts' weights, which a "
            "shared base FFN cannot express); use lora: materialised"
        )
    if base_config.get("model_type") != "llama":
        raise PlanError(
            f"{where}: 'shared' supports Llama bases (ComposerLoraMoeForCausalLM); the base is "
            f"{base_config.get('model_type')!r}; use lora: materialised"
        )
    if spec.router.tune is not None:
        raise PlanError(
            f"{spec.where('router', 'tune')}: router tuning is not available with lora: shared "
            "yet; tune a materialised build, or give the tuned rows as router.weights"
        )
    for i, e in enumerate(experts):
        if e.kind != "lora":
            raise PlanError(
                f"{spec.where('experts', i)}: expert '{e.name}' is a full checkpoint "
                f"({e.kind}); lora: shared stores low-rank deltas only, so every expert must be "
                "a LoRA adapter; use lora: materialised to mix full and LoRA experts"
            )


def _check_full_expert(where: str, e: ResolvedInput, base_config: dict[str, Any]) -> None:
    cfg = json.loads((e.path / "config.json").read_text())
    for k in ("model_type", "hidden_size", "intermediate_size", "num_hidden_layers"):
        if cfg.get(k) != base_config.get(k):
            raise PlanError(
                f"{where}: expert '{e.name}': {k} is {cfg.get(k)!r}, the base has "
                f"{base_config.get(k)!r}"
            )


def _steps(plan: Plan) -> list[Step]:
    spec, init, n_moe = plan.spec, plan.router_init, len(plan.moe_layers)
    steps = [Step("resolve", f"{1 + len(plan.experts)} inputs, consent checked")]
    if plan.method == "compose/flexolmo":
        steps.append(Step("verify", "shared weights of every expert bit-identical to the base"))
    elif plan.experts:
        steps.append(Step("verify", "experts share the base's tensor names and shapes"))
    if init in ("hidden_mean",) or spec.router.gating_logit_norm or spec.router.public_calibration:
        steps.append(Step("calibrate", "FFN inputs of the base model on calibration text"))
    steps.append(Step("router", f"init {init!r} for {n_moe} MoE layers"))
    n_lora = sum(e.kind == "lora" for e in plan.experts)
    if n_lora and plan.lora == "shared":
        steps.append(
            Step("lora", f"{n_lora} LoRA experts kept as factors beside one base FFN per layer")
        )
    elif n_lora:
        steps.append(
            Step("lora", f"{n_lora} LoRA experts materialised: FFN = base + scale * B @ A")
        )
    steps.append(
        Step(
            "write",
            f"{plan.arch.architecture} shards (<= {spec.output.max_shard_size} each), streamed "
            "per tensor",
        )
    )
    if spec.router.tune is not None:
        t = spec.router.tune
        biases = " and biases" if spec.style == "flexolmo" and spec.router.expert_bias else ""
        steps.append(
            Step(
                "tune",
                f"router rows{biases} of "
                f"{n_moe} MoE layers, {t.steps} steps of {t.batch_size} x {t.seq_len} "
                f"tokens on proxy text of {', '.join(plan.proxy)} (<= {t.max_chunks} sequences "
                "each)",
            )
        )
    steps.append(Step("finish", "config.json, tokenizer files, composition.json, atomic rename"))
    return steps


def _notes(plan: Plan) -> list[str]:
    notes: list[str] = []
    flex_rows = plan.method == "compose/flexolmo" and plan.router_init in (
        "domain_embedding",
        "trained",
    )
    if flex_rows and not plan.spec.router.public_calibration:
        notes.append(
            "no router.public_calibration: the public expert's router row is zero "
            "(logit 0 for every token)"
        )
    for e in plan.experts:
        if e.kind != "lora":
            continue
        layers = {layer_of(w) for w in adapter_targets(e.path)}
        unused = sorted(i for i in layers if i is not None and i not in plan.moe_layers)
        if unused:
            notes.append(
                f"LoRA expert '{e.name}' adapts layers {ranges(unused)} (not MoE layers): those "
                "deltas are not used; dense layers keep the public FFN"
            )
    if plan.dense_layers:
        notes.append(
            f"layers {ranges(plan.dense_layers)} have no experts: every expert there is a copy "
            "of the dense FFN with a zero router (exactly the dense function)"
        )
    return notes
