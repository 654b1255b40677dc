"""Hidden states the router sees (the FFN input of every layer), measured on calibration text.

The dense model is loaded whole with transformers for this pass (it is the only step that does
so); router_train.ffn_inputs hooks record each layer's MLP input, and composer.text tokenises the
text (no EOS between texts; UTF-8 bytes modulo the vocabulary for checkpoints without a
tokenizer).
"""

from __future__ import annotations

from pathlib import Path

import torch

from composer.text import checkpoint_tokenizer, encode_texts, token_blocks
from router_train.ffn_inputs import FfnInputHooks
from router_train.layers import ffn_modules

SEQ_LEN = 256


def _token_ids(
    model_dir: Path, texts: list[str], vocab_size: int, max_tokens: int
) -> list[list[int]]:
    """Tokenise with the checkpoint's tokenizer; checkpoints without one (tiny test models) use
    UTF-8 bytes modulo the vocabulary. The first ``max_tokens`` ids in blocks of SEQ_LEN, the
    last one possibly shorter."""
    tok = checkpoint_tokenizer(model_dir, vocab_size)
    ids = encode_texts(texts, tok, eos=False)[:max_tokens]
    return token_blocks(ids, SEQ_LEN, keep_partial=True)


@torch.no_grad()
def mlp_inputs(
    model_dir: Path, text_sets: list[list[str]], layers: list[int], max_tokens: int
) -> list[dict[int, torch.Tensor]]:
    """For each text set: layer -> [tokens, hidden] float32 FFN inputs under the model."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    vocab = int(model.config.vocab_size)
    captured: dict[int, list[torch.Tensor]] = {}

    def keep(layer: int, x: torch.Tensor) -> None:
        captured.setdefault(layer, []).append(x.reshape(-1, x.shape[-1]).float())

    out: list[dict[int, torch.Tensor]] = []
    try:
        with FfnInputHooks(ffn_modules(model, layers), keep):
            for texts in text_sets:
                captured.clear()
                seqs = _token_ids(Path(model_dir), texts, vocab, max_tokens)
                if not seqs:
                    raise ValueError("calibration text is empty")
                for seq in seqs:
                    model(input_ids=torch.tensor([seq]))
                out.append({i: torch.cat(captured[i]) for i in layers})
    finally:
        del model
    return out
