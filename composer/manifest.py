"""composition.json: what went into a build (inputs, consent, spec, parameters, versions)."""

from __future__ import annotations

import importlib.metadata
import json
from pathlib import Path
from typing import Any

from composer.inputs import ResolvedInput
from composer.plan import PUBLIC_EXPERT, Plan
from registry.composition import COMPOSITION_FORMAT


def library_versions() -> dict[str, str]:
    """Versions of the libraries that shape the output bytes (recorded in composition.json)."""
    out = {}
    for dist, key in (
        ("torch", "torch"),
        ("transformers", "transformers"),
        ("safetensors", "safetensors"),
        ("moe-composer", "composer"),
    ):
        try:
            out[key] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[key] = "unknown"
    return out


def input_record(r: ResolvedInput) -> dict[str, Any]:
    """One input as composition.json records it."""
    return {
        "ref": r.ref,
        "name": r.name,
        "kind": r.kind,
        "registry_id": r.registry_id,
        "version": r.version,
        "sha256": r.sha256,
        "owner": r.owner,
        "policy": r.policy,
        "domain": r.domain,
        "base_fingerprint": r.base_fingerprint,
    }


def manifest(
    plan: Plan,
    seed: int,
    files: dict[str, str],
    extras: dict[str, str],
    router_tuning: dict[str, Any] | None = None,
) -> dict[str, Any]:
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
        },
        "router_tuning": router_tuning,
        "seed": seed,
        "versions": library_versions(),
        "files": dict(sorted(files.items())),
        "extras": dict(sorted(extras.items())),
    }


def write_manifest(path: Path, data: dict[str, Any]) -> None:
    Path(path).write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
