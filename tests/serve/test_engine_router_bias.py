"""A composed FlexOlmo-style model keeps its experts' router bias beside the weights
(composer_router.safetensors). The vLLM engine with our plugin must route with it, exactly as
transformers does through router_train.biased_router.load_composed; a plain load (no bias)
differs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

from composer.build import build
from composer.inputs import LocalPathResolver
from composer.spec_load import parse_spec
from composer.tiny_models import make_tiny_llama, perturb_ffn
from router_train.bias_file import read_router_bias
from router_train.biased_router import load_composed
from tests.serve.server_fixtures import offline_request, tiny_llm

pytestmark = pytest.mark.slow

PROMPTS = [[5, 6, 7, 8, 9, 10, 11, 12], [30, 31, 32, 33, 34, 35], [100, 101], [7]]
MAX_TOKENS = 10


@pytest.fixture(scope="module")
def composed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("bias")
    base = make_tiny_llama(root / "public", seed=0)
    perturb_ffn(base, root / "code", seed=1, scale=0.2)
    perturb_ffn(base, root / "legal", seed=2, scale=0.2)
    g = torch.Generator().manual_seed(3)
    # Large biases that flip the top-2 choice for most tokens: without them routing differs.
    router = {}
    for i in range(2):
        router[f"model.layers.{i}.router"] = torch.randn(3, 128, generator=g) * 0.05
        router[f"model.layers.{i}.router_bias"] = torch.tensor([0.0, -6.0, 4.0])
    save_file(router, str(root / "router.safetensors"))
    spec = parse_spec(
        f"method: compose\nstyle: flexolmo\nbase: {base}\n"
        f"experts: [{root / 'code'}, {root / 'legal'}]\ntop_k: 2\n"
        f"router: {{init: given, weights: {root / 'router.safetensors'}}}\n"
    )
    return build(spec, root / "composed", LocalPathResolver(), progress=False).out_dir


def _hf_greedy(model: torch.nn.Module) -> list[list[int]]:
    outs = []
    for ids in PROMPTS:
        x = torch.tensor([ids])
        y = model.generate(x, max_new_tokens=MAX_TOKENS, do_sample=False, min_new_tokens=MAX_TOKENS)
        outs.append(y[0, len(ids) :].tolist())
    return outs


def test_engine_applies_the_router_bias(composed: Path) -> None:
    from transformers import AutoModelForCausalLM

    assert sorted(read_router_bias(composed)) == [0, 1]
    want = _hf_greedy(load_composed(composed))
    plain = _hf_greedy(AutoModelForCausalLM.from_pretrained(composed, dtype=torch.float32).eval())
    assert plain != want  # the bias changes the model

    llm: Any = tiny_llm(composed, skip_tokenizer_init=True)
    try:
        requests = [
            offline_request(llm, p, None, max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)
            for p in PROMPTS
        ]
        outs = llm.generate([r[0] for r in requests], [r[1] for r in requests])
        got = [list(o.outputs[0].token_ids) for o in outs]
    finally:
        llm.llm_engine.engine_core.shutdown()
    assert got == want
