"""Text -> token ids -> token chunks: the one tokenisation path of training, tuning, calibration
and Expert Merging.

A checkpoint's own tokenizer (transformers) is used without special tokens: no BOS anywhere.
Tiny test models ship no tokenizer; they read text as UTF-8 bytes instead (:class:`ByteTokenizer`,
modulo the vocabulary when one is given). What differs between callers is kept explicit, so each
produces exactly the ids it always did:

- EOS after each document: training, tuning and Expert Merging (``eos=True``); the calibration of
  hidden-state routers (composer.calibration) does not add it.
- Bytes fallback: training and tuning choose it explicitly (``"bytes"``, ids 0..255);
  calibration and Expert Merging fall back to it when the checkpoint has no tokenizer files
  (:func:`checkpoint_tokenizer`, ids modulo the vocabulary).
- Packing: training, tuning and evaluation (composer.eval) read documents (composer.train.data)
  until ``max_chunks`` full chunks and drop the tail (:func:`pack_documents`,
  :func:`load_token_chunks`); calibration cuts the first ``max_tokens`` ids into blocks and
  keeps a shorter last one (:func:`token_blocks`); Expert Merging keeps full blocks only, or one
  short sequence when there is less than a block (composer.merging.calibrated.calibration_batches).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch

from composer.train.data import path_hash, read_document, split_files

TOKENIZER_MARKERS = ("tokenizer.json", "tokenizer_config.json")


class Tokenizer(Protocol):
    eos_id: int | None

    def encode(self, text: str) -> list[int]: ...


class ByteTokenizer:
    """UTF-8 bytes as token ids (for tiny test models, which ship no tokenizer): 0..255, or
    modulo ``vocab_size`` when given (a vocabulary smaller than 256)."""

    eos_id: int | None = None

    def __init__(self, vocab_size: int | None = None) -> None:
        self.vocab_size = vocab_size

    def encode(self, text: str) -> list[int]:
        data = text.encode("utf-8")
        if self.vocab_size is None:
            return list(data)
        return [b % self.vocab_size for b in data]


class HFTokenizer:
    """A checkpoint's own tokenizer (transformers), without special tokens."""

    def __init__(self, model_dir: str | Path) -> None:
        from transformers import AutoTokenizer

        self._tok = AutoTokenizer.from_pretrained(str(model_dir))
        self.eos_id = self._tok.eos_token_id

    def encode(self, text: str) -> list[int]:
        return list(self._tok(text, add_special_tokens=False)["input_ids"])


def load_tokenizer(public_dir: str | Path, tokenizer: str | Tokenizer | None) -> Tokenizer:
    """``None``: the tokenizer saved in ``public_dir``; ``"bytes"``: :class:`ByteTokenizer`."""
    if tokenizer is None:
        return HFTokenizer(public_dir)
    if tokenizer == "bytes":
        return ByteTokenizer()
    if isinstance(tokenizer, str):
        return HFTokenizer(tokenizer)
    return tokenizer


def has_tokenizer(model_dir: str | Path) -> bool:
    """Whether the checkpoint folder ships tokenizer files."""
    return any((Path(model_dir) / n).is_file() for n in TOKENIZER_MARKERS)


def checkpoint_tokenizer(model_dir: str | Path, vocab_size: int) -> Tokenizer:
    """The checkpoint's tokenizer, or UTF-8 bytes modulo ``vocab_size`` when it has none."""
    return HFTokenizer(model_dir) if has_tokenizer(model_dir) else ByteTokenizer(vocab_size)


def read_texts(paths: Iterable[str | Path]) -> list[str]:
    """Whole text files (calibration text): undecodable bytes replaced, nothing else changed."""
    return [Path(p).read_text(errors="replace") for p in paths]


def encode_texts(texts: Iterable[str], tokenizer: Tokenizer, *, eos: bool) -> list[int]:
    """The texts' ids one after the other; ``eos``: the tokenizer's EOS after each (if it has
    one)."""
    ids: list[int] = []
    for t in texts:
        ids.extend(tokenizer.encode(t))
        if eos and tokenizer.eos_id is not None:
            ids.append(int(tokenizer.eos_id))
    return ids


def token_blocks(ids: Sequence[int], seq_len: int, *, keep_partial: bool) -> list[list[int]]:
    """``ids`` cut into consecutive blocks of ``seq_len``; a shorter last block is kept only with
    ``keep_partial``."""
    blocks = [list(ids[i : i + seq_len]) for i in range(0, len(ids), seq_len)]
    if blocks and not keep_partial and len(blocks[-1]) < seq_len:
        blocks.pop()
    return blocks


@dataclass(frozen=True)
class TokenChunks:
    """Packed token blocks: ``train`` and ``heldout`` are int64 [n, seq_len]."""

    train: torch.Tensor
    heldout: torch.Tensor
    train_files: int = 0
    heldout_files: int = 0


def pack_documents(
    files: Sequence[Path], tok: Tokenizer, seq_len: int, max_chunks: int, strip: bool | None
) -> tuple[torch.Tensor, int]:
    """Documents of ``files`` in the given order (binary and empty ones skipped), each followed
    by EOS, packed into full blocks of ``seq_len`` until ``max_chunks``: (int64 [n, seq_len],
    documents read). Training, tuning and evaluation pack text this way."""
    buf: list[int] = []
    used = 0
    need = max_chunks * seq_len
    for f in files:
        if len(buf) >= need:
            break
        text = read_document(f, strip)
        if text is None:
            continue
        buf.extend(encode_texts([text], tok, eos=True))
        used += 1
    n = min(len(buf) // seq_len, max_chunks)
    return torch.tensor(buf[: n * seq_len], dtype=torch.long).reshape(n, seq_len), used


def load_token_chunks(
    paths: Sequence[str | Path],
    tokenizer: Tokenizer,
    seq_len: int,
    *,
    max_train_chunks: int,
    max_heldout_chunks: int,
    heldout_fraction: float = 0.1,
    seed: int = 0,
    strip: bool | None = None,
) -> TokenChunks:
    """Read, split by path hash, shuffle (seeded), tokenise and pack files until enough chunks.

    Only as many files as needed are read, so a folder of thousands of files costs little. When the
    held-out side gets no chunk (no file hashed there, or only binary / too short ones), training
    files move there, smallest hash first, until one gives a chunk.
    """
    train, heldout = split_files(paths, heldout_fraction, seed)
    held_t, n_held = pack_documents(heldout, tokenizer, seq_len, max_heldout_chunks, strip)
    if held_t.shape[0] == 0 and heldout_fraction > 0 and max_heldout_chunks > 0:
        for f in sorted(train, key=path_hash)[:-1]:  # keep at least one training file
            train.remove(f)
            held_t, n_held = pack_documents([f], tokenizer, seq_len, max_heldout_chunks, strip)
            if held_t.shape[0]:
                break
    train_t, n_train = pack_documents(train, tokenizer, seq_len, max_train_chunks, strip)
    if train_t.shape[0] == 0:
        raise ValueError(f"not enough text for one chunk of {seq_len} tokens in {list(paths)}")
    return TokenChunks(train_t, held_t, n_train, n_held)
