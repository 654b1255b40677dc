"""The expert artifact `composer expert train` writes: a checkpoint of the public architecture
whose ``mlp.*`` are the trained FFN (every other tensor and file copied byte for byte) plus
``composer_expert.safetensors`` (domain embedding, router row and bias per trained layer).

The registry addresses artifacts by file hash, so the safetensors bytes must be stable: this
module writes the format itself (sorted names and metadata). The write is atomic.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from registry.checkpoint import EXPERT_FILE

FORMAT_TAG = "flexolmo-expert/1"
WEIGHTS_FILE = "model.safetensors"


def _checkpoint_tensors(model_dir: Path) -> dict[str, torch.Tensor]:
    files = sorted(model_dir.glob("*.safetensors"))
    files = [f for f in files if f.name != EXPERT_FILE]
    if not files:
        raise FileNotFoundError(f"no *.safetensors in {model_dir}")
    out: dict[str, torch.Tensor] = {}
    for f in files:
        with safe_open(str(f), framework="pt") as fh:
            for k in fh.keys():  # noqa: SIM118 - safe_open has no __iter__
                out[k] = fh.get_tensor(k)
    return out


_ST_DTYPES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}


def save_file(
    tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str] | None = None
) -> None:
    """Write a safetensors file with a byte-stable layout (sorted names and metadata keys).

    ``safetensors.torch.save_file`` orders metadata through a hash map, so equal content can give
    different bytes; the registry addresses artifacts by file hash, so we write the (simple) format
    ourselves: u64 header length, JSON header padded with spaces to 8 bytes, raw little-endian data.
    """
    header: dict[str, Any] = {}
    if metadata:
        header["__metadata__"] = {k: metadata[k] for k in sorted(metadata)}
    blobs: list[bytes] = []
    offset = 0
    for name in sorted(tensors):
        t = tensors[name].detach().contiguous()
        data = t.reshape(-1).view(torch.uint8).numpy().tobytes()
        header[name] = {
            "dtype": _ST_DTYPES[t.dtype],
            "shape": list(t.shape),
            "data_offsets": [offset, offset + len(data)],
        }
        blobs.append(data)
        offset += len(data)
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)
    with open(path, "wb") as fh:
        fh.write(len(head).to_bytes(8, "little"))
        fh.write(head)
        for b in blobs:
            fh.write(b)


def write_expert_artifact(
    public_dir: str | Path,
    out_dir: str | Path,
    ffn_weights: dict[str, torch.Tensor],
    extras: dict[str, torch.Tensor],
    metadata: dict[str, str],
    *,
    overwrite: bool = False,
) -> Path:
    """Write the expert checkpoint atomically (temp folder in the same parent, then rename).

    ``ffn_weights`` replace the public tensors of the same names (cast to their dtype and shape must
    match); every other tensor and every non-weight file (config, tokenizer) is copied unchanged.
    On any failure the temp folder is removed and ``out_dir`` is left as it was.
    """
    public_dir, out_dir = Path(public_dir), Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise FileExistsError(f"{out_dir} exists (pass overwrite=True to replace it)")
    tensors = _checkpoint_tensors(public_dir)
    for name, t in ffn_weights.items():
        if name not in tensors or ".mlp." not in name:
            raise KeyError(f"{name} is not an FFN tensor of the public checkpoint")
        if tuple(t.shape) != tuple(tensors[name].shape):
            raise ValueError(f"{name}: shape {tuple(t.shape)} != {tuple(tensors[name].shape)}")
        tensors[name] = t.detach().to(tensors[name].dtype).contiguous()
    with replaced_folder(out_dir) as tmp:
        tmp.mkdir()
        for f in public_dir.iterdir():
            if f.is_file() and not f.name.endswith((".safetensors", ".safetensors.index.json")):
                shutil.copy2(f, tmp / f.name)
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        write_extras(tmp, extras, metadata)
    return out_dir


@contextmanager
def replaced_folder(out_dir: Path) -> Iterator[Path]:
    """A temporary path beside ``out_dir`` (not created) that replaces ``out_dir`` when the block
    succeeds (an old folder is removed only after the swap) and is removed when it fails: an
    artifact is either the old one or the whole new one, never half-written."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        yield tmp
        if out_dir.exists():
            old = out_dir.parent / f".{out_dir.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(out_dir, old)
            os.replace(tmp, out_dir)
            shutil.rmtree(old)
        else:
            os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_extras(
    folder: Path, extras: Mapping[str, torch.Tensor], metadata: Mapping[str, str]
) -> None:
    """composer_expert.safetensors (router rows, biases, domain embedding; float32)."""
    tensors = {k: v.detach().to(torch.float32).contiguous() for k, v in extras.items()}
    save_file(tensors, str(folder / EXPERT_FILE), metadata=dict(metadata))


def read_expert_extras(expert_dir: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of an artifact's ``composer_expert.safetensors``."""
    with safe_open(str(Path(expert_dir) / EXPERT_FILE), framework="pt") as fh:
        return {k: fh.get_tensor(k) for k in fh.keys()}, dict(fh.metadata() or {})  # noqa: SIM118
