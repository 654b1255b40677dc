"""Streaming safetensors writer: the tensor layout is fixed up front, data is written as produced.

Because every tensor's name, dtype and shape is known before any data exists, each shard's header
is written first and tensors are appended one by one, so memory holds one tensor at a time rather
than a whole shard. The files are byte-identical to what safetensors readers expect (8-byte
header length, JSON header padded with spaces to 8 bytes, contiguous data in header order).
"""

from __future__ import annotations

import hashlib
import json
import resource
import shutil
import struct
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import torch

from composer.checkpoint import DTYPE_NAMES, INDEX_NAME, SafetensorsFile
from composer.errors import BuildError
from registry.store import file_sha256

# Files of the base copied into every output beside the weights.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
)


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n * torch.empty((), dtype=self.dtype).element_size()


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """The tensor's memory as bytes, without copying (the caller keeps ``t`` alive)."""
    t = t.detach().contiguous().cpu()
    if t.numel() == 0:
        return memoryview(b"")
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())


def _header(specs: list[TensorSpec], metadata: dict[str, str]) -> bytes:
    head: dict[str, object] = {"__metadata__": dict(sorted(metadata.items()))}
    off = 0
    for s in specs:
        head[s.name] = {
            "dtype": DTYPE_NAMES[s.dtype],
            "shape": list(s.shape),
            "data_offsets": [off, off + s.nbytes],
        }
        off += s.nbytes
    raw = json.dumps(head, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


def partition(groups: list[list[TensorSpec]], max_shard_bytes: int) -> list[list[TensorSpec]]:
    """Split the ordered tensor list into shards, keeping groups (layers) together when they fit."""
    shards: list[list[TensorSpec]] = [[]]
    size = 0
    for group in groups:
        gsize = sum(s.nbytes for s in group)
        if shards[-1] and size + gsize > max_shard_bytes:
            shards.append([])
            size = 0
        for s in group:
            if shards[-1] and size + s.nbytes > max_shard_bytes and gsize > max_shard_bytes:
                shards.append([])
                size = 0
            shards[-1].append(s)
            size += s.nbytes
    return [s for s in shards if s]


class ShardWriter:
    """Writes ``shards`` (from ``partition``) into ``out_dir`` as tensors arrive, in order."""

    def __init__(self, out_dir: Path, shards: list[list[TensorSpec]], prefix: str = "model"):
        self.out_dir = Path(out_dir)
        n = len(shards)
        self.names = (
            [f"{prefix}.safetensors"]
            if n == 1
            else [f"{prefix}-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        )
        self._shards = shards
        self._order = [s for shard in shards for s in shard]
        self._pos = 0
        self._shard_i = -1
        self._left_in_shard = 0
        self._fh: BinaryIO | None = None
        self._hash = hashlib.sha256()
        self.sha256: dict[str, str] = {}
        self.total_bytes = sum(s.nbytes for s in self._order)

    def _open_next(self) -> None:
        self._finish_file()
        self._shard_i += 1
        specs = self._shards[self._shard_i]
        self._fh = (self.out_dir / self.names[self._shard_i]).open("wb")
        self._hash = hashlib.sha256()
        self._emit(_header(specs, {"format": "pt"}))
        self._left_in_shard = len(specs)

    def _emit(self, data: bytes | memoryview) -> None:
        assert self._fh is not None
        self._fh.write(data)
        self._hash.update(data)

    def _finish_file(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self.sha256[self.names[self._shard_i]] = self._hash.hexdigest()
            self._fh = None

    def write(self, name: str, tensor: torch.Tensor) -> None:
        if self._pos >= len(self._order):
            raise RuntimeError(f"unexpected tensor {name}: layout already complete")
        spec = self._order[self._pos]
        if name != spec.name or tuple(tensor.shape) != spec.shape or tensor.dtype != spec.dtype:
            raise RuntimeError(
                f"tensor {name} {tuple(tensor.shape)} {tensor.dtype} does not match the planned "
                f"{spec.name} {spec.shape} {spec.dtype}"
            )
        if self._left_in_shard == 0:
            self._open_next()
        self._emit(tensor_bytes(tensor))
        self._left_in_shard -= 1
        self._pos += 1

    def write_all(self, items: Iterable[tuple[str, torch.Tensor]]) -> None:
        for name, t in items:
            self.write(name, t)

    def close(self) -> dict[str, str]:
        """Finish the last shard and write the index; returns file name -> sha256."""
        if self._pos != len(self._order):
            missing = self._order[self._pos].name
            raise RuntimeError(f"build ended before writing {missing}")
        self._finish_file()
        # Always write the index: vLLM then loads only the files it names, so extra files in the
        # folder (composer_router.safetensors) are never read as weights.
        weight_map = {s.name: self.names[i] for i, shard in enumerate(self._shards) for s in shard}
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
        text = json.dumps(index, indent=2, sort_keys=True) + "\n"
        (self.out_dir / INDEX_NAME).write_text(text)
        self.sha256[INDEX_NAME] = hashlib.sha256(text.encode()).hexdigest()
        return dict(self.sha256)


def write_small(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> str:
    """Write a small safetensors file deterministically; returns its sha256."""
    specs = [TensorSpec(k, tuple(v.shape), v.dtype) for k, v in tensors.items()]
    data = _header(specs, metadata) + b"".join(bytes(tensor_bytes(tensors[s.name])) for s in specs)
    Path(path).write_bytes(data)
    return hashlib.sha256(data).hexdigest()


def peak_rss() -> int:
    """The process's resident-set high-water mark in bytes."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def new_output_path(out_dir: str | Path) -> Path:
    """``out_dir`` as an absolute path; a build refuses an existing folder before any work."""
    out = Path(out_dir).absolute()
    if out.exists():
        raise BuildError(f"output {out} already exists; choose a new folder")
    return out


@contextmanager
def atomic_dir(out: Path) -> Iterator[Path]:
    """Yield a temporary folder beside ``out``; rename it to ``out`` when the block succeeds,
    delete it when the block raises (Ctrl-C included), so no half-written output ever exists."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def overwrite_tensors(folder: Path, tensors: dict[str, torch.Tensor]) -> dict[str, str]:
    """Write new values of existing tensors into their shards in place (same dtype and shape, so
    headers and offsets stay valid); returns file name -> new sha256 of every file changed."""
    weight_map: dict[str, str] = json.loads((folder / INDEX_NAME).read_text())["weight_map"]
    by_file: dict[str, list[str]] = {}
    for name in tensors:
        if name not in weight_map:
            raise BuildError(f"{folder}: no tensor {name} to overwrite")
        by_file.setdefault(weight_map[name], []).append(name)
    changed: dict[str, str] = {}
    for file_name, names in sorted(by_file.items()):
        path = folder / file_name
        shard = SafetensorsFile(path)
        try:
            places = []
            for name in names:
                dtype, shape = shard.meta(name)
                t = tensors[name]
                if tuple(t.shape) != shape:
                    raise BuildError(f"{name}: shape {tuple(t.shape)}, the shard holds {shape}")
                places.append((shard.file_offset(name), t.to(dtype)))
        finally:
            shard.close()
        with path.open("r+b") as f:
            for offset, t in places:
                f.seek(offset)
                f.write(tensor_bytes(t))
        changed[file_name] = file_sha256(path)
    return changed
