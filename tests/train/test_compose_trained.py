"""A single trained expert, composed with the public model, is exactly the model its owner
trained: same held-out perplexity, provided the router bias (composer_router.safetensors) is
applied. Plain loaders drop the bias and give another model."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from composer.build import build
from composer.inputs import LocalPathResolver
from composer.spec_load import parse_spec
from composer.text import TokenChunks
from composer.train.evaluate import perplexity
from composer.train.expert import TrainResult, train_expert
from router_train.bias_file import read_router_bias

STEPS = dict(steps=30, seq_len=32, batch_size=8, lr=1e-3, progress=False)


def _compose(public: Path, trained: TrainResult, out: Path) -> Path:
    spec = parse_spec(
        f"method: compose\nstyle: flexolmo\nbase: {public}\nexperts: [{trained.out_dir}]\n"
        f"top_k: 2\nmoe_layers: {trained.layers}\nrouter: {{init: trained}}\n"
    )
    return build(spec, out, LocalPathResolver(), progress=False).out_dir


@pytest.mark.parametrize("arch", ["tiny_llama", "tiny_olmo2"])
def test_composed_single_expert_is_the_trained_model(
    arch: str,
    request: pytest.FixtureRequest,
    pattern_data: TokenChunks,
    tmp_path: Path,
) -> None:
    public: Path = request.getfixturevalue(arch)
    trained = train_expert(
        public, pattern_data, tmp_path / "expert", domain="arith", layers=[1], **STEPS
    )
    out = _compose(public, trained, tmp_path / "composed")

    bias = read_router_bias(out)
    assert sorted(bias) == [1] and bias[1][0] == 0 and bias[1][1] < 0

    composed_ppl = perplexity(out, pattern_data.heldout)  # loads with the bias applied
    assert composed_ppl == pytest.approx(trained.expert_ppl, rel=1e-4)
    assert composed_ppl < 0.9 * trained.public_ppl  # it learnt something

    plain = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert perplexity(plain, pattern_data.heldout) != pytest.approx(composed_ppl, rel=1e-3)
