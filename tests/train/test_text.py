"""composer.text is the one tokenisation path; each caller keeps its own ids (EOS, bytes fallback,
blocks), and calibration and domain embeddings see the same FFN inputs (one capture)."""

from __future__ import annotations

from pathlib import Path

import torch

from composer.calibration import SEQ_LEN, _token_ids, mlp_inputs
from composer.text import (
    ByteTokenizer,
    checkpoint_tokenizer,
    encode_texts,
    has_tokenizer,
    token_blocks,
)
from composer.tiny_moe import write_tiny_tokenizer
from router_train.biased_router import load_composed
from router_train.domain_embedding import compute_domain_embeddings
from router_train.layers import decoder_layers


class _Words:
    """A tokenizer with an EOS id: one id per word."""

    eos_id: int | None = 9

    def encode(self, text: str) -> list[int]:
        return [len(w) for w in text.split()]


def test_bytes_raw_or_modulo_the_vocabulary() -> None:
    assert ByteTokenizer().encode("é!") == [195, 169, 33]
    assert ByteTokenizer(100).encode("é!") == [95, 69, 33]


def test_eos_after_each_text_only_when_asked() -> None:
    assert encode_texts(["a bb", "ccc"], _Words(), eos=True) == [1, 2, 9, 3, 9]
    assert encode_texts(["a bb", "ccc"], _Words(), eos=False) == [1, 2, 3]
    assert encode_texts(["ab"], ByteTokenizer(), eos=True) == [97, 98]  # no EOS id, none added


def test_blocks_keep_the_short_tail_only_when_asked() -> None:
    ids = list(range(7))
    assert token_blocks(ids, 3, keep_partial=True) == [[0, 1, 2], [3, 4, 5], [6]]
    assert token_blocks(ids, 3, keep_partial=False) == [[0, 1, 2], [3, 4, 5]]
    assert token_blocks(ids[:6], 3, keep_partial=False) == [[0, 1, 2], [3, 4, 5]]
    assert token_blocks([], 3, keep_partial=True) == []


def test_checkpoint_tokenizer_falls_back_to_bytes(tmp_path: Path) -> None:
    assert not has_tokenizer(tmp_path)
    assert checkpoint_tokenizer(tmp_path, 50).encode("d") == [100 % 50]
    write_tiny_tokenizer(tmp_path)
    tok = checkpoint_tokenizer(tmp_path, 50)
    assert has_tokenizer(tmp_path) and tok.encode("hello w12") == [7, 12] and tok.eos_id == 2
    # calibration adds no EOS, no BOS, and cuts blocks of SEQ_LEN keeping the tail
    ids = _token_ids(tmp_path, ["hello w12", "world"], 256, 10_000)
    assert ids == [[7, 12, 8]]
    long = _token_ids(tmp_path, ["w12 " * (SEQ_LEN + 3)], 256, SEQ_LEN + 1)
    assert [len(b) for b in long] == [SEQ_LEN, 1]


def test_calibration_and_domain_embedding_capture_the_same_inputs(tiny_llama: Path) -> None:
    text = "the same text for both captures\n" * 3
    (captured,) = mlp_inputs(tiny_llama, [[text]], [0, 1], 10_000)
    ids = torch.tensor(_token_ids(tiny_llama, [text], 256, 10_000))
    model = load_composed(tiny_llama)
    assert len(decoder_layers(model)) == 2
    means = compute_domain_embeddings(model, ids, [0, 1])
    for i in (0, 1):
        want = captured[i].double().mean(dim=0).float()
        torch.testing.assert_close(means[i], want, rtol=0, atol=1e-6)
