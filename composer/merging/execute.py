"""Execute a merge-family plan (merge, moe_merge) in the build's temporary folder: run the
algorithm's executor (streamed dense, calibrated or moe_merge), then config.json and the
composition record."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from composer.errors import BuildError
from composer.manifest import input_record, library_versions
from composer.merging.calibrated import run_calibrated
from composer.merging.dense import run_dense
from composer.merging.lora_output import run_lora_output
from composer.merging.moe import run_moe_merge
from composer.merging.params import MoeMergeSettings
from composer.merging.plan import MergePlan, open_inputs
from composer.plan import Written
from composer.tensor_jobs import TensorExecutor
from merge.errors import MergeError
from registry.composition import COMPOSITION_FORMAT


def execute(
    plan: MergePlan,
    tmp: Path,
    seed: int,
    progress: bool,
    executor: TensorExecutor | None = None,
) -> Written:
    """Write the merged checkpoint into ``tmp``; a MergeError becomes a BuildError naming the
    method. ``executor`` runs the per-tensor (dense) and per-layer (moe_merge) work; calibrated
    merges learn from whole-model forward passes and always run here."""
    try:
        if plan.spec.output.format == "lora":  # an adapter: no config.json
            params = _effective_params(plan, seed)
            files, extra = run_lora_output(plan, params, tmp, progress)
            return Written(files=files, manifest=_manifest(plan, seed, files, extra))
        with open_inputs(plan) as (base, experts):
            files, config, extra = _run(plan, base, experts, tmp, seed, progress, executor)
    except MergeError as exc:
        raise BuildError(f"{plan.method}: {exc}") from exc
    (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return Written(files=files, manifest=_manifest(plan, seed, files, extra))


def _effective_params(plan: MergePlan, seed: int) -> Any:
    """The method parameters with the build seed, unless the spec set parameters.seed."""
    p = plan.settings.params
    if "seed" in type(p).model_fields and "seed" not in (plan.spec.parameters or {}):
        p = p.model_copy(update={"seed": seed})
    return p


def _run(
    plan: MergePlan,
    base: Any,
    experts: list[Any],
    tmp: Path,
    seed: int,
    progress: bool,
    executor: TensorExecutor | None,
) -> tuple[dict[str, str], dict[str, Any], dict[str, Any]]:
    params = _effective_params(plan, seed)
    s = plan.settings
    names = [e.name for e in plan.experts]
    config = dict(plan.base_config)
    if plan.spec.output.dtype != "auto":
        config["dtype"] = plan.dtype
        config.pop("torch_dtype", None)
    if isinstance(s, MoeMergeSettings):
        return run_moe_merge(plan, base, s, params, tmp, config, progress, executor)
    if s.calibrated:
        files, extra = run_calibrated(plan, base, experts, names, s, params, tmp, progress)
    else:
        files = run_dense(
            plan, base, experts, names, s.method, params, tmp, progress, executor=executor
        )
        extra = {}
    return files, config, extra


def _manifest(
    plan: MergePlan, seed: int, files: dict[str, str], extra: dict[str, Any]
) -> dict[str, Any]:
    """composition.json of a merge-family build."""
    s = plan.settings
    params = _effective_params(plan, seed).model_dump(mode="json", by_alias=True)
    cal = s.calibration
    return {
        "format": COMPOSITION_FORMAT,
        "name": plan.spec.name,
        "method": plan.method,
        "architecture": (plan.base_config.get("architectures") or [None])[0],
        "base": input_record(plan.base),
        "experts": extra.pop("experts", None)
        or [{"index": i, **input_record(e)} for i, e in enumerate(plan.experts)],
        "spec": plan.spec.model_dump(mode="json"),
        "spec_sha256": plan.spec.sha256(),
        "parameters": {
            "method": s.method,
            **params,
            "calibration": json.loads(json.dumps(cal, default=str)) if cal else None,
            **({"calibration_tokens": s.tokens.model_dump()} if cal else {}),
            "dtype": plan.dtype,
        },
        "results": extra,
        "seed": seed,
        "versions": library_versions(),
        "files": dict(sorted(files.items())),
    }
