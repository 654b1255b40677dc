"""composition.json: the pieces every build method records (inputs, library versions) and how
the file is written. Each family assembles its own record (composer.compose.execute.manifest,
composer.merging.execute)."""

from __future__ import annotations

import importlib.metadata
import json
from pathlib import Path
from typing import Any

from composer.inputs import ResolvedInput


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


def write_manifest(path: Path, data: dict[str, Any]) -> None:
    Path(path).write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
