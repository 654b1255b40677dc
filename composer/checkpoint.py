"""Lazy, streaming reads of Hugging Face safetensors checkpoints.

Tensors are read one at a time with positioned reads from the file (no mmap), so resident memory
holds only the tensors a step is using; files are opened on first use, so a damaged shard is
found when the build reaches the layer stored in it.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from registry.errors import CheckpointError

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
# output.dtype of a spec -> torch dtype.
TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

INDEX_NAME = "model.safetensors.index.json"
SKIP_SUFFIXES = ("rotary_emb.inv_freq",)  # buffers some old checkpoints store; never weights


class SafetensorsFile:
    """One .safetensors file: header parsed at open, tensors read by offset on request."""

    def __init__(self, path: Path):
        self.path = Path(path)
        try:
            self._fd = os.open(self.path, os.O_RDONLY)
        except OSError as e:
            raise CheckpointError(f"cannot open {self.path}: {e.strerror}") from None
        size = os.fstat(self._fd).st_size
        raw = os.pread(self._fd, 8, 0)
        if len(raw) < 8:
            self.close()
            raise CheckpointError(f"{self.path}: not a safetensors file (too short)")
        (n,) = struct.unpack("<Q", raw)
        if n > size - 8 or n > 100 * 2**20:
            self.close()
            raise CheckpointError(f"{self.path}: corrupted header (length {n}, file {size} bytes)")
        try:
            header: dict[str, Any] = json.loads(os.pread(self._fd, n, 8))
        except (ValueError, UnicodeDecodeError):
            self.close()
            raise CheckpointError(f"{self.path}: corrupted header (not JSON)") from None
        self.metadata: dict[str, str] = header.pop("__metadata__", None) or {}
        self.entries = header
        self._data_start = 8 + n
        end = max((e["data_offsets"][1] for e in header.values()), default=0)
        if self._data_start + end > size:
            self.close()
            raise CheckpointError(
                f"{self.path}: truncated ({size} bytes, header promises {self._data_start + end})"
            )

    def keys(self) -> list[str]:
        return list(self.entries)

    def meta(self, name: str) -> tuple[torch.dtype, tuple[int, ...]]:
        e = self.entries[name]
        return DTYPES[e["dtype"]], tuple(e["shape"])

    def file_offset(self, name: str) -> int:
        """Where ``name``'s data starts in the file."""
        return self._data_start + int(self.entries[name]["data_offsets"][0])

    def read_bytes(self, name: str) -> bytes:
        a, b = self.entries[name]["data_offsets"]
        data = os.pread(self._fd, b - a, self._data_start + a)
        if len(data) != b - a:
            raise CheckpointError(f"{self.path}: short read of {name}")
        return data

    def _pread(self, name: str, offset: int, nbytes: int) -> torch.Tensor:
        """``nbytes`` of ``name``'s data from ``offset`` on, straight into a fresh uint8 tensor
        (one copy, no intermediate buffers; positioned reads, so threads may share the file)."""
        a, _ = self.entries[name]["data_offsets"]
        buf = torch.empty(nbytes, dtype=torch.uint8)
        view = memoryview(buf.numpy())
        done = 0
        while done < nbytes:
            n = os.preadv(self._fd, [view[done:]], self._data_start + a + offset + done)
            if n <= 0:
                raise CheckpointError(f"{self.path}: short read of {name}")
            done += n
        return buf

    def read(self, name: str) -> torch.Tensor:
        dtype, shape = self.meta(name)
        a, b = self.entries[name]["data_offsets"]
        return self._pread(name, 0, b - a).view(dtype).reshape(shape)

    def read_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows [start, stop) along the first dimension (a 0-d tensor is one row of shape (1,))."""
        dtype, shape = self.meta(name)
        rows = shape[0] if shape else 1
        if not 0 <= start <= stop <= rows:
            raise CheckpointError(f"{self.path}: rows {start}:{stop} of {name} ({rows} rows)")
        a, b = self.entries[name]["data_offsets"]
        row_bytes = (b - a) // rows if rows else 0
        data = self._pread(name, start * row_bytes, (stop - start) * row_bytes)
        return data.view(dtype).reshape((stop - start, *shape[1:]) if shape else (1,))

    def same_bytes(self, name: str, other: SafetensorsFile, other_name: str) -> bool:
        """Bit-identical data and metadata, compared in chunks (memory stays small)."""
        if self.meta(name) != other.meta(other_name):
            return False
        a, b = self.entries[name]["data_offsets"]
        oa, _ = other.entries[other_name]["data_offsets"]
        off, step = 0, 1 << 16  # small first: a fine-tuned tensor differs at once
        while off < b - a:
            n = min(step, b - a - off)
            mine = os.pread(self._fd, n, self._data_start + a + off)
            theirs = os.pread(other._fd, n, other._data_start + oa + off)
            if mine != theirs or len(mine) != n:
                return False
            off, step = off + n, min(step * 2, 1 << 23)
        return True

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __del__(self) -> None:
        self.close()


class Checkpoint:
    """A checkpoint folder: config.json plus one or more safetensors shards."""

    def __init__(self, path: Path):
        self.path = Path(path)
        cfg = self.path / "config.json"
        if not cfg.is_file():
            raise CheckpointError(f"{self.path}: no config.json")
        self.config: dict[str, Any] = json.loads(cfg.read_text())
        index = self.path / INDEX_NAME
        if index.is_file():
            weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
            self._where = dict(weight_map)
        elif (self.path / "model.safetensors").is_file():
            self._where = {
                k: "model.safetensors" for k in _header_keys(self.path / "model.safetensors")
            }
        else:
            raise CheckpointError(f"{self.path}: no model.safetensors or {INDEX_NAME}")
        self._where = {k: v for k, v in self._where.items() if not k.endswith(SKIP_SUFFIXES)}
        self._files: dict[str, SafetensorsFile] = {}

    @property
    def num_layers(self) -> int:
        return int(self.config["num_hidden_layers"])

    def tensor_names(self) -> list[str]:
        return list(self._where)

    def keys(self) -> list[str]:  # same as tensor_names(); other modules use this spelling
        return self.tensor_names()

    def __contains__(self, name: str) -> bool:
        return name in self._where

    # Read-only mapping of names to tensors, each read when asked for: a lazy state dict.
    def __getitem__(self, name: str) -> torch.Tensor:
        return self.read(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)

    def _file(self, name: str) -> SafetensorsFile:
        if name not in self._where:
            raise CheckpointError(f"{self.path}: no tensor {name}")
        fname = self._where[name]
        if fname not in self._files:
            self._files[fname] = SafetensorsFile(self.path / fname)
        f = self._files[fname]
        if name not in f.entries:
            raise CheckpointError(f"{f.path}: index lists {name} but the file lacks it")
        return f

    def meta(self, name: str) -> tuple[torch.dtype, tuple[int, ...]]:
        return self._file(name).meta(name)

    def read(self, name: str) -> torch.Tensor:
        return self._file(name).read(name)

    def read_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        return self._file(name).read_rows(name, start, stop)

    def open_all(self) -> None:
        """Open every shard now (threads that read later then never race to open one)."""
        for name in self._where:
            self._file(name)

    def read_bytes(self, name: str) -> bytes:
        return self._file(name).read_bytes(name)

    def same_bytes(self, name: str, other: Checkpoint) -> bool:
        return self._file(name).same_bytes(name, other._file(name), name)

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files.clear()


def _header_keys(path: Path) -> list[str]:
    f = SafetensorsFile(path)
    try:
        return f.keys()
    finally:
        f.close()
