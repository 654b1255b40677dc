"""The owner's data: file collection, gunzip + roff stripping, hash split, packing, file format."""

from __future__ import annotations

import gzip
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from composer.text import ByteTokenizer, load_token_chunks
from composer.train.artifact import read_expert_extras, save_file
from composer.train.data import collect_files, is_heldout, path_hash, read_document
from composer.train.expert import train_expert
from router_train.layers import parse_layers

MAN = """.\\" a comment
.TH LS 1
.SH NAME
ls \\- list directory contents
.B ls
'\\" another request
Show \\fBall\\fR files.
"""


@pytest.fixture()
def corpus(tmp_path: Path) -> Path:
    root = tmp_path / "owner"
    (root / "docs" / "__pycache__").mkdir(parents=True)
    for i in range(30):
        (root / "docs" / f"doc{i:02d}.txt").write_text(f"document {i}: " + "lorem ipsum " * 40)
    (root / "docs" / "__pycache__" / "x.pyc").write_bytes(b"\x00\x01binary")
    (root / "docs" / "blob.bin").write_bytes(b"\x00" * 100)
    (root / "man").mkdir()
    (root / "man" / "ls.1.gz").write_bytes(gzip.compress(MAN.encode()))
    return root


def test_collect_files_expands_folders_and_globs(corpus: Path) -> None:
    files = collect_files([corpus / "docs", str(corpus / "man" / "*.gz")])
    names = [f.name for f in files]
    assert names == sorted(names) or files == sorted(files)
    assert "x.pyc" not in names and "ls.1.gz" in names and len(files) == 32
    assert collect_files([corpus / "docs" / "doc01.txt"]) == [corpus / "docs" / "doc01.txt"]
    with pytest.raises(FileNotFoundError):
        collect_files([corpus / "nothing*"])


def test_read_document_gunzips_and_strips_roff(corpus: Path) -> None:
    text = read_document(corpus / "man" / "ls.1.gz")
    assert text == "ls - list directory contents\nShow all files."
    raw = read_document(corpus / "man" / "ls.1.gz", strip=False)
    assert raw == MAN
    assert read_document(corpus / "docs" / "blob.bin") is None  # binary skipped


def test_split_is_deterministic_and_disjoint(corpus: Path) -> None:
    files = collect_files([corpus])
    held = [f for f in files if is_heldout(f, 0.2)]
    assert held == [f for f in files if is_heldout(f, 0.2)]
    assert 0 < len(held) < len(files)
    assert all(is_heldout(f, 0.5) for f in held)  # monotone in the fraction


def test_load_token_chunks_packs_train_and_heldout_separately(corpus: Path) -> None:
    tok = ByteTokenizer()
    data = load_token_chunks(
        [corpus], tok, 64, max_train_chunks=20, max_heldout_chunks=5, heldout_fraction=0.2
    )
    assert data.train.shape == (20, 64) and data.heldout.shape == (5, 64)
    assert data.train.dtype == torch.long and int(data.train.max()) < 256
    # Only as many files as needed were read; and held-out text never appears in train.
    assert data.train_files < 30
    held_text = bytes(data.heldout[0].tolist()).decode(errors="replace")
    train_text = b"".join(bytes(r.tolist()) for r in data.train).decode(errors="replace")
    assert held_text not in train_text
    again = load_token_chunks(
        [corpus], tok, 64, max_train_chunks=20, max_heldout_chunks=5, heldout_fraction=0.2
    )
    assert torch.equal(again.train, data.train) and torch.equal(again.heldout, data.heldout)


def test_train_from_text_files_with_byte_tokenizer(
    corpus: Path, tiny_llama: Path, tmp_path: Path
) -> None:
    res = train_expert(
        tiny_llama,
        [corpus],
        tmp_path / "exp",
        domain="lorem",
        layers="last:1",
        steps=4,
        seq_len=32,
        batch_size=2,
        tokenizer="bytes",
        progress=False,
        heldout_fraction=0.2,
    )
    assert res.layers == [1] and len(res.losses) == 4 and res.heldout_chunks > 0
    assert res.expert_ppl > 0 and res.public_ppl > 0
    assert read_expert_extras(res.out_dir)[1]["domain"] == "lorem"


def test_parse_layers() -> None:
    assert parse_layers(None, 4) == [0, 1, 2, 3]
    assert parse_layers("all", 3) == [0, 1, 2]
    assert parse_layers("every:4", 30) == [0, 4, 8, 12, 16, 20, 24, 28]
    assert parse_layers("last:3", 30) == [27, 28, 29]
    assert parse_layers("5,1,1", 30) == [1, 5]
    assert parse_layers([2, 0], 3) == [0, 2]
    for bad in ("30", [], "-1"):
        with pytest.raises(ValueError):
            parse_layers(bad, 30)


def test_save_file_is_valid_safetensors_and_byte_stable(tmp_path: Path) -> None:
    tensors = {
        "b": torch.arange(6, dtype=torch.bfloat16).reshape(2, 3),
        "a": torch.tensor(-0.5),
        "c": torch.tensor([[-0.0, 1.5]], dtype=torch.float32),
    }
    meta = {"z": "1", "a": "2", "domain": "x"}
    save_file(tensors, tmp_path / "one.safetensors", meta)
    save_file(
        dict(reversed(tensors.items())), tmp_path / "two.safetensors", dict(reversed(meta.items()))
    )
    assert (tmp_path / "one.safetensors").read_bytes() == (
        tmp_path / "two.safetensors"
    ).read_bytes()
    with safe_open(str(tmp_path / "one.safetensors"), framework="pt") as fh:
        assert fh.metadata() == meta
        for k, t in tensors.items():
            got = fh.get_tensor(k)
            assert got.dtype == t.dtype and got.shape == t.shape
            assert torch.equal(got.view(-1).view(torch.uint8), t.reshape(-1).view(torch.uint8))


def test_heldout_is_never_empty_when_the_first_heldout_file_is_binary(tmp_path: Path) -> None:
    """No file hashes into the held-out side and the fallback's first pick is binary: the next
    training file is moved instead, so held-out perplexity always has text to score."""
    paths = [tmp_path / f"f{i}.txt" for i in range(6)]
    first = min(paths, key=path_hash)
    for p in paths:
        p.write_bytes(b"\x00\x01" * 64 if p == first else (f"text {p.name} " * 20).encode())
    data = load_token_chunks(
        [tmp_path], ByteTokenizer(), 16, max_train_chunks=100, max_heldout_chunks=4,
        heldout_fraction=1e-12,
    )  # fmt: skip
    assert data.heldout.shape[0] > 0 and data.heldout_files == 1
    assert data.train_files == 4  # the binary file is in neither side
