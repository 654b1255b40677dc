"""Hidden states the router sees (the FFN input of every layer), measured on calibration text.

The dense model is loaded whole with transformers for this pass (it is the only step that does
so); hooks record each layer's MLP input.
"""

from __future__ import annotations

from pathlib import Path

import torch

SEQ_LEN = 256


def _token_ids(
    model_dir: Path, texts: list[str], vocab_size: int, max_tokens: int
) -> list[list[int]]:
    """Tokenise with the checkpoint's tokenizer; checkpoints without one (tiny test models) use
    UTF-8 bytes modulo the vocabulary."""
    has_tok = any((model_dir / n).is_file() for n in ("tokenizer.json", "tokenizer_config.json"))
    ids: list[int] = []
    if has_tok:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(model_dir)
        for t in texts:
            ids.extend(tok(t, add_special_tokens=False)["input_ids"])
    else:
        for t in texts:
            ids.extend(b % vocab_size for b in t.encode())
    ids = ids[:max_tokens]
    return [ids[i : i + SEQ_LEN] for i in range(0, len(ids), SEQ_LEN) if ids[i : i + SEQ_LEN]]


@torch.no_grad()
def mlp_inputs(
    model_dir: Path, text_sets: list[list[str]], layers: list[int], max_tokens: int
) -> list[dict[int, torch.Tensor]]:
    """For each text set: layer -> [tokens, hidden] float32 FFN inputs under the model."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    vocab = int(model.config.vocab_size)
    captured: dict[int, list[torch.Tensor]] = {}
    hooks = []
    for i in layers:

        def hook(_mod: torch.nn.Module, args: tuple[torch.Tensor, ...], i: int = i) -> None:
            captured.setdefault(i, []).append(args[0].reshape(-1, args[0].shape[-1]).float())

        hooks.append(model.model.layers[i].mlp.register_forward_pre_hook(hook))
    out: list[dict[int, torch.Tensor]] = []
    try:
        for texts in text_sets:
            captured.clear()
            seqs = _token_ids(Path(model_dir), texts, vocab, max_tokens)
            if not seqs:
                raise ValueError("calibration text is empty")
            for seq in seqs:
                model(input_ids=torch.tensor([seq]))
            out.append({i: torch.cat(captured[i]) for i in layers})
    finally:
        for h in hooks:
            h.remove()
        del model
    return out


def read_texts(paths: list[Path]) -> list[str]:
    return [Path(p).read_text(errors="replace") for p in paths]
