"""Input resolution: spec references (registry `name[@version]` or paths) -> checkpoint folders.

The registry's resolver (registry.resolver.RegistryResolver) implements the same Protocol and
fills owner, policy and hashes; LocalPathResolver only accepts folders that exist on disk.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol

from registry.checkpoint import ADAPTER_CONFIG, EXPERT_FILE
from registry.errors import ComposerError
from registry.store import file_sha256


@dataclass(frozen=True)
class ResolvedInput:
    ref: str  # as written in the spec
    path: Path  # local checkpoint folder, already verified
    name: str  # expert name used in config.json / composition.json
    kind: str  # "base" | "ffn" | "dense" | "lora"
    registry_id: int | None = None
    version: str | None = None
    sha256: str | None = None  # content hash of the checkpoint (manifest hash)
    owner: str | None = None
    policy: str | None = None  # "opt_in" | "opt_out" | "restricted"
    domain: str | None = None
    base_fingerprint: str | None = None


class Resolver(Protocol):
    def resolve(self, ref: str, *, role: Literal["base", "expert"]) -> ResolvedInput: ...


class ResolveError(ComposerError):
    """A reference that names no usable checkpoint."""


# Files whose content defines a checkpoint for hashing (weights and config, not tokenizer caches).
_HASHED_SUFFIXES = (".safetensors", ".json")


def checkpoint_sha256(path: Path) -> str:
    """Manifest hash of a folder: sha256 over sorted (relative name, file sha256) lines."""
    lines = []
    for f in sorted(p for p in Path(path).rglob("*") if p.is_file()):
        if f.suffix not in _HASHED_SUFFIXES:
            continue
        lines.append(f"{f.relative_to(path).as_posix()} {file_sha256(f)}\n")
    return hashlib.sha256("".join(lines).encode()).hexdigest()


class LocalPathResolver:
    """Resolves references that are checkpoint folders on disk (relative to ``root``).

    ``names`` optionally maps a reference to the expert name; otherwise the folder name is used.
    Policy is None (local files carry no consent record). Hashes are computed on demand. An
    expert may also be a PEFT LoRA adapter folder (adapter_config.json, no config.json): kind
    "lora", applied to the spec's base by the build.
    """

    def __init__(
        self,
        root: Path | None = None,
        names: dict[str, str] | None = None,
        hash_inputs: bool = True,
    ):
        self.root = Path(root) if root is not None else None
        self.names = dict(names or {})
        self.hash_inputs = hash_inputs

    def resolve(self, ref: str, *, role: Literal["base", "expert"]) -> ResolvedInput:
        path = Path(ref).expanduser()
        if not path.is_absolute() and self.root is not None:
            path = self.root / path
        adapter = role == "expert" and (path / ADAPTER_CONFIG).is_file()
        if not adapter and not (path / "config.json").is_file():
            what = "config.json" if role == "base" else f"config.json or {ADAPTER_CONFIG}"
            raise ResolveError(
                f"{ref!r} is not a checkpoint folder (no {what} at {path.absolute()})"
            )
        path = path.resolve()
        if role == "base":
            kind = "base"
        elif adapter:
            kind = "lora"
        else:
            kind = "ffn" if _has_expert_file(path) else "dense"
        return ResolvedInput(
            ref=ref,
            path=path,
            name=self.names.get(ref, path.name),
            kind=kind,
            sha256=checkpoint_sha256(path) if self.hash_inputs else None,
        )


def _has_expert_file(path: Path) -> bool:
    return (path / EXPERT_FILE).is_file()
