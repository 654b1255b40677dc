"""Per-request LoRA adapters on a dense base: which registered adapters a server loads, checked
against the base before the engine starts, and the policy bindings that govern them.

The served names are `[base, *adapters]`, one slot each, so the MoE server's selection and
policy code (serve/experts.py, serve/policy.py) decides adapters too: the base is the ungoverned
`kind: base` slot (like a build's public slot), every adapter a `kind: lora` slot bound to its
registry version id and content sha256. vLLM loads each adapter from the registry's verified
checkout of its blobs (`RegistryService.checkout`), never from a path a client names.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from registry.checkpoint import ADAPTER_CONFIG, inspect_folder
from registry.composition import SlotBinding
from registry.errors import ComposerError
from registry.refs import parse_ref

# vLLM's accepted `--max-lora-rank` values (vllm.config.lora.MaxLoRARanks).
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


@dataclass(frozen=True)
class ServedAdapter:
    """One adapter as the server loads it: its slot binding (policy), files and rank."""

    binding: SlotBinding
    path: str  # the registry's verified checkout
    rank: int


@dataclass(frozen=True)
class AdapterSet:
    """The base's client-facing name and the adapters served beside it (slot order)."""

    base_name: str
    adapters: tuple[ServedAdapter, ...]

    @property
    def names(self) -> list[str]:
        return [self.base_name, *(a.binding.name for a in self.adapters)]

    def bindings(self) -> list[SlotBinding]:
        return [SlotBinding(0, self.base_name, "base"), *(a.binding for a in self.adapters)]

    def vllm_args(self) -> list[str]:
        """vLLM server arguments: LoRA on, every adapter resident, rank cap from the adapters."""
        need = max(a.rank for a in self.adapters)
        rank = next(r for r in VLLM_LORA_RANKS if r >= need)
        argv = ["--enable-lora", "--max-loras", str(len(self.adapters))]
        argv += ["--max-lora-rank", str(rank), "--lora-modules"]
        return argv + [f"{a.binding.name}={a.path}" for a in self.adapters]

    def to_json(self) -> str:
        adapters = [asdict(a) for a in self.adapters]
        return json.dumps({"base_name": self.base_name, "adapters": adapters})

    @classmethod
    def from_json(cls, text: str) -> AdapterSet:
        doc = json.loads(text)
        adapters = tuple(
            ServedAdapter(SlotBinding(**a["binding"]), a["path"], int(a["rank"]))
            for a in doc["adapters"]
        )
        return cls(str(doc["base_name"]), adapters)


class AdapterError(ComposerError):
    """An adapter the server refuses to load (named in the message)."""


def adapter_rank(path: Path) -> int:
    """The largest LoRA rank in a PEFT adapter_config.json (`r` and any `rank_pattern`)."""
    config = json.loads((path / ADAPTER_CONFIG).read_text())
    pattern = config.get("rank_pattern") or {}
    return max([int(config.get("r", 8)), *(int(r) for r in pattern.values())])


def check_dense(base_path: Path) -> None:
    """vLLM applies LoRA per request to dense models only on CPU (MoE experts need Triton)."""
    config = json.loads((base_path / "config.json").read_text())
    moe = (
        config.get("composer_experts")
        or config.get("num_local_experts")
        or config.get("num_experts")
    )
    if moe:
        raise AdapterError(
            f"{base_path}: --adapters needs a dense base; this is a mixture-of-experts model "
            f"(serve it without --adapters, choosing experts per request)"
        )


def resolve_adapters(
    service: Any, base_path: Path, base_name: str, base_fingerprint: str, refs: Sequence[str]
) -> AdapterSet:
    """Look the adapters up in the registry (`service`: a RegistryService) and refuse, naming
    the adapter, any that is not a `--kind lora` expert registered against this very base
    (same fingerprint), or whose name would be served twice."""
    check_dense(base_path)
    if not refs:
        raise AdapterError("--adapters: give at least one registered adapter (NAME[@VERSION])")
    served: list[ServedAdapter] = []
    seen = {base_name: "the base"}
    for ref in refs:
        name, _ = parse_ref(ref)
        if name in seen:
            raise AdapterError(f"--adapters: '{ref}': the name '{name}' is already {seen[name]}")
        doc, path = service.expert_for_build(ref)
        where = f"--adapters: '{ref}' ({doc['ref']})"
        if doc["kind"] != "lora":
            raise AdapterError(
                f"{where} is a '{doc['kind']}' expert, not a LoRA adapter (--kind lora)"
            )
        if doc["base_fingerprint"] != base_fingerprint:
            raise AdapterError(
                f"{where} was registered against base '{doc['base']}', not the served base "
                f"'{base_name}' (fingerprints differ)"
            )
        rank = adapter_rank(path)
        if rank > VLLM_LORA_RANKS[-1]:
            raise AdapterError(f"{where}: rank {rank} exceeds vLLM's limit {VLLM_LORA_RANKS[-1]}")
        binding = SlotBinding(
            index=len(served) + 1, name=name, kind="lora", version_id=int(doc["id"]),
            sha256=str(doc["sha256"]), ref=str(doc["ref"]),
        )  # fmt: skip
        served.append(ServedAdapter(binding, str(path), rank))
        seen[name] = f"adapter {doc['ref']}"
    return AdapterSet(base_name, tuple(served))


def resolve_base(service: Any, target: str) -> tuple[Path, str, str]:
    """(folder, client-facing name, fingerprint) of BASE: a checkpoint folder or the name of a
    registered base (then its verified checkout)."""
    path = Path(target)
    if (path / "config.json").is_file():
        info = inspect_folder(path)
        return path.resolve(), path.resolve().name, info.fingerprint()
    base, folder = service.base_for_build(target)
    return folder, base.name, base.fingerprint


def serve_adapters(
    target: str, adapters: str, served_model_name: str | None = None
) -> tuple[Path, AdapterSet, str]:
    """What `composer serve BASE --adapters a,b@2` serves: (base folder, adapters, registry
    URL). The adapters' policies and files live in the registry, so it must exist."""
    from registry.errors import NotInitialisedError
    from registry.service import RegistryService
    from registry.settings import database_url

    refs = [r.strip() for r in adapters.split(",")]
    if not all(refs):
        raise AdapterError(f"--adapters: empty name in '{adapters}' (expected NAME[,NAME@VERSION])")
    try:
        service = RegistryService()
    except NotInitialisedError as e:
        raise AdapterError(f"--adapters needs the registry the adapters are in: {e}") from None
    try:
        path, name, fingerprint = resolve_base(service, target)
        served = resolve_adapters(service, path, served_model_name or name, fingerprint, refs)
        return path, served, database_url()
    finally:
        service.close()
