"""Inspect a checkpoint or PEFT adapter folder without loading it into torch.

Every safetensors file is parsed and checked against its own header (a truncated or corrupted
file is refused, naming the file), and hashed in one streaming pass: sha256 of every file (its
content address in the blob store) and of every tensor's bytes (for fingerprints and for the
bit-identity check of FlexOlmo experts' shared weights).
"""

from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from registry.errors import CheckpointError

# Bytes per element of every dtype the safetensors format defines.
DTYPE_SIZES: dict[str, float] = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "F8_E8M0": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8,
}  # fmt: skip
MAX_HEADER_BYTES = 100 * 1024 * 1024
CHUNK = 8 * 1024 * 1024
PICKLE_SUFFIXES = {".bin", ".pt", ".pth", ".pkl", ".ckpt"}
# Extra tensors an expert carries beside its weights (domain embedding, router row and bias).
EXPERT_FILE = "composer_expert.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


@dataclass(frozen=True)
class TensorInfo:
    dtype: str
    shape: tuple[int, ...]
    sha256: str
    file: str


@dataclass(frozen=True)
class FileInfo:
    relpath: str
    size: int
    sha256: str


@dataclass
class CheckpointInfo:
    """What a folder holds: its files, its config and the tensors of its weights."""

    path: Path
    kind: str  # "model" (config.json + safetensors) or "lora" (PEFT adapter)
    config: dict[str, Any]
    architecture: str
    files: list[FileInfo] = field(default_factory=list)
    tensors: dict[str, TensorInfo] = field(default_factory=dict)
    extras: dict[str, TensorInfo] = field(default_factory=dict)

    @property
    def manifest(self) -> dict[str, str]:
        return {f.relpath: f.sha256 for f in self.files}

    @property
    def manifest_sha256(self) -> str:
        return manifest_hash(self.manifest)

    @property
    def total_size(self) -> int:
        return sum(f.size for f in self.files)

    def fingerprint(self) -> str:
        return fingerprint(self.architecture, self.tensors)

    def shape_map(self) -> dict[str, list[Any]]:
        """name -> [dtype, shape, sha256], what the registry stores for a base model."""
        return {n: [t.dtype, list(t.shape), t.sha256] for n, t in sorted(self.tensors.items())}


def manifest_hash(manifest: dict[str, str]) -> str:
    return hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest()


def fingerprint(architecture: str, tensors: dict[str, TensorInfo]) -> str:
    """sha256 over the architecture, every tensor's name, dtype, shape and content hash."""
    doc = {
        "architecture": architecture,
        "tensors": [[n, t.dtype, list(t.shape), t.sha256] for n, t in sorted(tensors.items())],
    }
    return hashlib.sha256(json.dumps(doc, separators=(",", ":")).encode()).hexdigest()


def inspect_folder(path: Path) -> CheckpointInfo:
    """Validate and hash a Hugging Face checkpoint folder or a PEFT LoRA adapter folder."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: path not found")
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a folder (expected a checkpoint folder)")
    if (path / ADAPTER_CONFIG).is_file():
        kind, config_name = "lora", ADAPTER_CONFIG
    elif (path / "config.json").is_file():
        kind, config_name = "model", "config.json"
    else:
        raise CheckpointError(
            f"{path}: no config.json (not a Hugging Face checkpoint folder) "
            f"and no {ADAPTER_CONFIG} (not a PEFT adapter folder)"
        )
    config = _read_json(path / config_name)
    if kind == "lora":
        architecture = f"peft-{str(config.get('peft_type', 'LORA')).lower()}"
    else:
        archs = config.get("architectures") or []
        if not archs:
            raise CheckpointError(f"{path / config_name}: field 'architectures' is missing")
        architecture = str(archs[0])

    info = CheckpointInfo(path=path, kind=kind, config=config, architecture=architecture)
    files = sorted(p for p in path.rglob("*") if p.is_file() and not _hidden(p, path))
    for p in files:
        rel = p.relative_to(path).as_posix()
        if p.suffix in PICKLE_SUFFIXES:
            raise CheckpointError(
                f"{p}: pickle-based weights are not accepted; convert to safetensors"
            )
        if p.suffix == ".safetensors":
            file_sha, size, tensors = scan_safetensors(p)
            target = info.extras if rel == EXPERT_FILE else info.tensors
            for name, (dtype, shape, sha) in tensors.items():
                if name in target:
                    raise CheckpointError(f"{p}: tensor '{name}' also in {target[name].file}")
                target[name] = TensorInfo(dtype, shape, sha, rel)
        else:
            file_sha, size = hash_file(p)
        info.files.append(FileInfo(rel, size, file_sha))
    if not info.tensors:
        want = ADAPTER_WEIGHTS if kind == "lora" else "model.safetensors"
        raise CheckpointError(f"{path}: no safetensors weights found (expected {want})")
    return info


def scan_safetensors(
    p: Path,
) -> tuple[str, int, dict[str, tuple[str, tuple[int, ...], str]]]:
    """Check a safetensors file against its header; return (file sha256, size, tensors)."""
    size = p.stat().st_size
    file_hash = hashlib.sha256()
    with p.open("rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(
                f"{p}: corrupted safetensors file: shorter than its 8-byte header"
            )
        (n,) = struct.unpack("<Q", head)
        if n > MAX_HEADER_BYTES or 8 + n > size:
            raise CheckpointError(
                f"{p}: corrupted or truncated safetensors file: header length {n} "
                f"does not fit a file of {size} bytes"
            )
        raw = f.read(n)
        try:
            header = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{p}: corrupted safetensors file: bad JSON header ({e})") from e
        if not isinstance(header, dict):
            raise CheckpointError(f"{p}: corrupted safetensors file: header is not an object")
        header.pop("__metadata__", None)
        entries = sorted(
            (_check_entry(p, name, meta) for name, meta in header.items()), key=lambda e: e[3]
        )
        data_len = size - 8 - n
        expected = max((e[4] for e in entries), default=0)
        if expected != data_len:
            what = "truncated" if expected > data_len else "has trailing bytes"
            raise CheckpointError(
                f"{p}: corrupted safetensors file ({what}): header describes {expected} bytes "
                f"of tensor data, file holds {data_len}"
            )
        file_hash.update(head)
        file_hash.update(raw)
        tensors: dict[str, tuple[str, tuple[int, ...], str]] = {}
        pos = 0
        for name, dtype, shape, start, end in entries:
            if start < pos:
                raise CheckpointError(f"{p}: corrupted safetensors file: tensor '{name}' overlaps")
            if start > pos:
                file_hash.update(_read_exact(f, start - pos, p))
            th = hashlib.sha256()
            left = end - start
            while left:
                buf = _read_exact(f, min(CHUNK, left), p)
                th.update(buf)
                file_hash.update(buf)
                left -= len(buf)
            tensors[name] = (dtype, shape, th.hexdigest())
            pos = end
    return file_hash.hexdigest(), size, tensors


def safetensors_metadata(p: Path) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors file (string to string; {} when it has none)."""
    with Path(p).open("rb") as f:
        (n,) = struct.unpack("<Q", _read_exact(f, 8, p))
        if n > MAX_HEADER_BYTES:
            raise CheckpointError(f"{p}: corrupted safetensors file: header length {n}")
        try:
            meta = json.loads(_read_exact(f, n, p)).get("__metadata__") or {}
        except (UnicodeDecodeError, json.JSONDecodeError, AttributeError) as e:
            raise CheckpointError(f"{p}: corrupted safetensors file: bad JSON header ({e})") from e
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise CheckpointError(f"{p}: __metadata__ must map strings to strings")
    return meta


def _check_entry(p: Path, name: str, meta: Any) -> tuple[str, str, tuple[int, ...], int, int]:
    try:
        dtype = str(meta["dtype"])
        shape = tuple(int(d) for d in meta["shape"])
        start, end = (int(x) for x in meta["data_offsets"])
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{p}: corrupted safetensors header entry '{name}'") from e
    if dtype not in DTYPE_SIZES:
        raise CheckpointError(f"{p}: tensor '{name}': unknown dtype '{dtype}'")
    numel = 1
    for d in shape:
        numel *= d
    if end < start or (end - start) != int(numel * DTYPE_SIZES[dtype]):
        raise CheckpointError(
            f"{p}: corrupted safetensors header: tensor '{name}' {dtype}{list(shape)} "
            f"does not match its byte range [{start}, {end})"
        )
    return name, dtype, shape, start, end


def _read_exact(f: Any, n: int, p: Path) -> bytes:
    buf = f.read(n)
    if len(buf) != n:
        raise CheckpointError(f"{p}: truncated while reading")
    return buf


def hash_file(p: Path) -> tuple[str, int]:
    h = hashlib.sha256()
    size = 0
    with p.open("rb") as f:
        while buf := f.read(CHUNK):
            h.update(buf)
            size += len(buf)
    return h.hexdigest(), size


def _read_json(p: Path) -> dict[str, Any]:
    try:
        doc = json.loads(p.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{p}: not valid JSON ({e})") from e
    if not isinstance(doc, dict):
        raise CheckpointError(f"{p}: expected a JSON object")
    return doc


def _hidden(p: Path, root: Path) -> bool:
    return any(part.startswith(".") for part in p.relative_to(root).parts)
