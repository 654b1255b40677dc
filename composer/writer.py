"""Streaming safetensors writer: the tensor layout is fixed up front, data is written as produced.

Because every tensor's name, dtype and shape is known before any data exists, each shard's header
is written first and tensors are appended one by one, so memory holds one tensor at a time rather
than a whole shard. The files are byte-identical to what safetensors readers expect (8-byte
header length, JSON header padded with spaces to 8 bytes, contiguous data in header order).
"""

from __future__ import annotations

import hashlib
import json
import os
import resource
import shutil
import struct
import tempfile
import threading
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


def shard_names(n: int, prefix: str = "model") -> list[str]:
    return (
        [f"{prefix}.safetensors"]
        if n == 1
        else [f"{prefix}-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    )


def write_index(out_dir: Path, shards: list[list[TensorSpec]], names: list[str]) -> str:
    """Write model.safetensors.index.json; returns its sha256.

    Always written: vLLM then loads only the files it names, so extra files in the folder
    (composer_router.safetensors) are never read as weights.
    """
    weight_map = {s.name: names[i] for i, shard in enumerate(shards) for s in shard}
    total = sum(s.nbytes for shard in shards for s in shard)
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    text = json.dumps(index, indent=2, sort_keys=True) + "\n"
    (Path(out_dir) / INDEX_NAME).write_text(text)
    return hashlib.sha256(text.encode()).hexdigest()


class ShardWriter:
    """Writes ``shards`` (from ``partition``) into ``out_dir`` as tensors arrive, in order."""

    def __init__(self, out_dir: Path, shards: list[list[TensorSpec]], prefix: str = "model"):
        self.out_dir = Path(out_dir)
        self.names = shard_names(len(shards), prefix)
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
        self.sha256[INDEX_NAME] = write_index(self.out_dir, self._shards, self.names)
        return dict(self.sha256)


class ShardFiles:
    """The same files as ShardWriter, filled by positioned writes in any order.

    Every shard's header is written and the file sized up front, so several threads can write
    blocks of rows of different tensors at once, each straight to its place: no tensor has to
    be whole in memory, and nothing waits for the tensors before it. Each file's sha256 runs
    over its completed prefix whenever ``hash_ready`` is called (reading back from the page
    cache while the writers go on), and is finished by ``close``.
    """

    def __init__(self, out_dir: Path, shards: list[list[TensorSpec]], prefix: str = "model"):
        self.out_dir = Path(out_dir)
        self.names = shard_names(len(shards), prefix)
        self._shards = shards
        self._fds: list[int] = []
        self._where: dict[str, tuple[int, int, TensorSpec]] = {}
        self._left: dict[str, int] = {}
        self._lock = threading.Lock()
        self._hashes = [hashlib.sha256() for _ in shards]
        self._hashed = [0] * len(shards)  # per file: tensors hashed so far
        try:
            for i, specs in enumerate(shards):
                fd = os.open(self.out_dir / self.names[i], os.O_RDWR | os.O_CREAT | os.O_TRUNC)
                self._fds.append(fd)
                head = _header(specs, {"format": "pt"})
                _pwrite_all(fd, memoryview(head), 0)
                self._hashes[i].update(head)
                off = len(head)
                for spec in specs:
                    self._where[spec.name] = (fd, off, spec)
                    self._left[spec.name] = spec.nbytes
                    off += spec.nbytes
                os.ftruncate(fd, off)
        except BaseException:
            self._close_fds()
            raise

    def write_rows(self, name: str, start: int, rows: torch.Tensor) -> None:
        """Write ``rows`` (rows start.. of ``name``, first dimension) in place."""
        fd, off, spec = self._where[name]
        nrows = spec.shape[0] if spec.shape else 1
        row_shape = spec.shape[1:] if spec.shape else ()
        if (
            rows.dtype != spec.dtype
            or tuple(rows.shape[1:]) != tuple(row_shape)
            or (start + (rows.shape[0] if rows.dim() else 1) > nrows)
        ):
            raise RuntimeError(
                f"rows {start}.. of {name}: {tuple(rows.shape)} {rows.dtype} do not fit the "
                f"planned {spec.shape} {spec.dtype}"
            )
        data = tensor_bytes(rows)
        row_bytes = spec.nbytes // nrows if nrows else 0
        _pwrite_all(fd, data, off + start * row_bytes)
        with self._lock:
            self._left[name] -= len(data)

    def hash_ready(self) -> None:
        """Hash every file's tensors from where its hash stopped up to the first tensor not yet
        complete. Call from one thread at a time."""
        for i, specs in enumerate(self._shards):
            fd = self._fds[i]
            while self._hashed[i] < len(specs):
                spec = specs[self._hashed[i]]
                with self._lock:
                    if self._left[spec.name] != 0:
                        break
                _, off, _ = self._where[spec.name]
                for at in range(0, spec.nbytes, 1 << 23):
                    n = min(1 << 23, spec.nbytes - at)
                    self._hashes[i].update(os.pread(fd, n, off + at))
                self._hashed[i] += 1

    def close(self) -> dict[str, str]:
        """Check every tensor was written in full, write the index; file name -> sha256."""
        missing = [k for k, v in self._left.items() if v != 0]
        if missing:
            self._close_fds()
            raise RuntimeError(f"build ended with {missing[0]} not (or over-) written")
        self.hash_ready()
        self._close_fds()
        out = {name: h.hexdigest() for name, h in zip(self.names, self._hashes, strict=True)}
        out[INDEX_NAME] = write_index(self.out_dir, self._shards, self.names)
        return out

    def abort(self) -> None:
        self._close_fds()

    def _close_fds(self) -> None:
        for fd in self._fds:
            os.close(fd)
        self._fds = []


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    done = 0
    while done < len(data):
        done += os.pwrite(fd, data[done:], offset + done)


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
