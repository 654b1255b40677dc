"""The safetensors scanner, fingerprints and the blob store, without the CLI."""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from registry.checkpoint import inspect_folder, scan_safetensors
from registry.errors import CheckpointError, IntegrityFailure
from registry.store import BlobStore


def test_scan_matches_bytes_and_tensors(tmp_path: Path) -> None:
    a = torch.arange(6, dtype=torch.float32).reshape(2, 3)
    b = torch.ones(4, dtype=torch.bfloat16)
    f = tmp_path / "x.safetensors"
    save_file({"a": a, "b": b}, f)
    sha, size, tensors = scan_safetensors(f)
    assert sha == hashlib.sha256(f.read_bytes()).hexdigest() and size == f.stat().st_size
    assert tensors["a"][:2] == ("F32", (2, 3))
    assert tensors["a"][2] == hashlib.sha256(a.numpy().tobytes()).hexdigest()
    assert tensors["b"][:2] == ("BF16", (4,))


def test_trailing_bytes_are_refused(tmp_path: Path) -> None:
    f = tmp_path / "x.safetensors"
    save_file({"a": torch.zeros(3)}, f)
    with f.open("ab") as fh:
        fh.write(b"junk")
    with pytest.raises(CheckpointError, match="trailing bytes"):
        scan_safetensors(f)


def test_fingerprint_depends_on_content_not_file_layout(ckpts, tmp_path: Path) -> None:
    base = inspect_folder(ckpts["base"])
    assert base.fingerprint() == inspect_folder(ckpts["base"]).fingerprint()
    assert base.fingerprint() != inspect_folder(ckpts["ffn"]).fingerprint()
    # Same tensors split over two shards: same fingerprint, different manifest.
    from safetensors.torch import load_file

    tensors = load_file(ckpts["base"] / "model.safetensors")
    names = sorted(tensors)
    sharded = tmp_path / "sharded"
    sharded.mkdir()
    shutil.copy(ckpts["base"] / "config.json", sharded)
    save_file({n: tensors[n] for n in names[:5]}, sharded / "model-00001-of-00002.safetensors")
    save_file({n: tensors[n] for n in names[5:]}, sharded / "model-00002-of-00002.safetensors")
    info = inspect_folder(sharded)
    assert info.fingerprint() == base.fingerprint()
    assert info.manifest_sha256 != base.manifest_sha256


def test_store_publishes_read_only_and_detects_corruption(tmp_path: Path) -> None:
    store = BlobStore(tmp_path / "blobs")
    src = tmp_path / "src.bin"
    src.write_bytes(os.urandom(10_000))
    sha, size, staged = store.stage(src)
    assert sha == hashlib.sha256(src.read_bytes()).hexdigest() and size == 10_000
    assert store.publish(sha, staged) is True
    assert not staged.exists()
    assert store.publish(sha, store.stage(src)[2]) is False  # already there: staging removed
    assert list((tmp_path / "blobs" / "staging").iterdir()) == []
    blob = store.path_for(sha)
    assert oct(blob.stat().st_mode & 0o777) == oct(0o444)
    out = tmp_path / "out.bin"
    store.copy_out(sha, out)
    assert out.read_bytes() == src.read_bytes()
    os.chmod(blob, 0o644)
    blob.write_bytes(b"tampered")
    assert store.verify(sha) is not None
    out2 = tmp_path / "out2.bin"
    with pytest.raises(IntegrityFailure, match="corrupted"):
        store.copy_out(sha, out2)
    assert not out2.exists() and not list(tmp_path.glob("out2.bin*"))
