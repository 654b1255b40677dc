"""compose with LoRA experts: materialised builds equal builds of the equivalent full experts tensor
for tensor, and shared-base builds (ComposerLoraMoeForCausalLM) compute what materialised ones do.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from build_helpers import bit_equal, build_text, config, load_model, tensors, token_ids

from composer.compose.plan import make_plan
from composer.errors import PlanError
from composer.inputs import LocalPathResolver
from composer.spec import SpecError
from composer.spec_load import load_spec
from router_train.bias_file import ROUTER_FILE, read_router_bias
from router_train.biased_router import attach_router_bias

IDS = token_ids()


def _build(models: Path, tmp: Path, name: str, body: str) -> Path:
    return build_text(models, tmp / name, f"name: {name}\nmethod: compose\n{body}").out_dir


def _same_build(a: Path, b: Path) -> None:
    ta, tb = tensors(a), tensors(b)
    assert ta.keys() == tb.keys()
    for k in ta:
        assert bit_equal(ta[k], tb[k]), k
    assert config(a) == config(b)
    for f in (ROUTER_FILE, "model.safetensors.index.json"):
        assert (a / f).is_file() == (b / f).is_file()
        if (a / f).is_file():
            assert (a / f).read_bytes() == (b / f).read_bytes(), f


@pytest.mark.parametrize(
    ("body", "twin_body"),
    [
        (  # FlexOlmo: a LoRA expert beside a full FFN expert, router rows from the adapter folder
            "style: flexolmo\nbase: base\nexperts: [lcode, legal, llegal]\n",
            "style: flexolmo\nbase: base\nexperts: [{ref: lcode_full, name: lcode}, legal, "
            "{ref: llegal_full, name: llegal}]\n",
        ),
        (  # BTX: a LoRA on attention too is fine (the shared weights are averaged anyway)
            "style: btx\nbase: base\nexperts: [lattn, ft1]\ntop_k: 1\n",
            "style: btx\nbase: base\nexperts: [{ref: lattn_full, name: lattn}, ft1]\ntop_k: 1\n",
        ),
    ],
)
def test_materialised_equals_the_full_twin(
    loras: Path, tmp_path: Path, body: str, twin_body: str
) -> None:
    a = _build(loras, tmp_path, "lora", body)
    b = _build(loras, tmp_path, "twin", twin_body)
    _same_build(a, b)
    man = json.loads((a / "composition.json").read_text())
    assert man["parameters"]["lora"] == "materialised"
    assert man["experts"][-1]["kind"] in ("lora", "dense")
    assert man["experts"][0 if "btx" in body else 1]["kind"] == "lora"


@pytest.mark.parametrize(
    ("body", "error", "match"),
    [
        (
            "style: flexolmo\nbase: base\nexperts: [lcode, lattn]\n",
            PlanError,
            r"experts\[1\]: expert 'lattn': the adapter changes "
            r"'model\.layers\.0\.self_attn\.q_proj\.weight', a shared \(non-FFN\) weight",
        ),
        (
            "style: flexolmo\nbase: base\nlora: shared\nexperts: [lcode, code]\n",
            PlanError,
            r"experts\[1\]: expert 'code' is a full checkpoint \(ffn\); lora: shared stores",
        ),
        (
            "style: btx\nbase: base\nlora: shared\nexperts: [lcode, llegal]\n",
            PlanError,
            r"lora: 'shared' needs style flexolmo",
        ),
        (
            "style: flexolmo\nbase: olmo\nlora: shared\nexperts: [lcode]\n",
            PlanError,
            r"lora: 'shared' supports Llama bases \(ComposerLoraMoeForCausalLM\); the base is "
            "'olmo2'",
        ),
    ],
)
def test_lora_refusals(
    loras: Path, tmp_path: Path, body: str, error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=match):
        _build(loras, tmp_path, "bad", body)
    assert not (tmp_path / "bad").exists()


def test_lora_option_belongs_to_compose(loras: Path, tmp_path: Path) -> None:
    text = "method: upcycle\nbase: base\nnum_experts: 2\nlora: shared\n"
    with pytest.raises(SpecError, match=r":4: lora: only method 'compose' takes lora"):
        build_text(loras, tmp_path / "x", text)


@torch.no_grad()
def _logits(model: torch.nn.Module) -> torch.Tensor:
    return model(IDS).logits


@pytest.mark.parametrize("moe_layers", ["all", "[1]"])
def test_shared_equals_materialised(loras: Path, tmp_path: Path, moe_layers: str) -> None:
    import models  # noqa: F401  (registers ComposerLoraMoeForCausalLM with the Auto classes)
    from models.lora_moe import ComposerLoraMoeForCausalLM

    body = (
        f"style: flexolmo\nbase: base\nexperts: [lcode, llegal]\nmoe_layers: {moe_layers}\n"
        "top_k: 2\n"
    )
    a = _build(loras, tmp_path, "mat", body)
    b = _build(loras, tmp_path, "shared", body + "lora: shared\n")
    if moe_layers == "[1]":  # the plan says that the adapters' layer-0 deltas go unused
        spec = load_spec(tmp_path / "spec-mat.yaml")
        notes = make_plan(spec, LocalPathResolver(loras)).notes
        assert "LoRA expert 'lcode' adapts layers 0 (not MoE layers)" in " ".join(notes)
    cfg = config(b)
    assert cfg["architectures"] == ["ComposerLoraMoeForCausalLM"]
    assert cfg["composer_experts"] == ["public", "lcode", "llegal"]
    assert not (b / ROUTER_FILE).exists()  # the bias is in the checkpoint
    mat = load_model(a)  # plain transformers: MixtralForCausalLM
    bias = read_router_bias(a)
    assert bias and attach_router_bias(mat, bias) == len(bias)
    shared = load_model(b)  # no missing / unexpected weights
    assert isinstance(shared, ComposerLoraMoeForCausalLM)
    moe = [i for i, layer in enumerate(shared.model.layers) if hasattr(layer.mlp, "experts")]
    assert moe == ([0, 1] if moe_layers == "all" else [1])
    # (b) stores far less than (a): one FFN per layer instead of three
    size = {d: sum(t.numel() for t in tensors(d).values()) for d in (a, b)}
    assert size[b] < size[a]
    before = _logits(shared)
    torch.testing.assert_close(before, _logits(mat), rtol=0, atol=2e-5)
    assert not torch.allclose(before, load_model(loras / "base")(IDS).logits, atol=1e-3)

    # One expert excluded (its router logit at the masks' -1e9) in both: still the same.
    for i in moe:
        bias[i] = bias[i].clone()
        bias[i][1] = -1.0e9
        shared.model.layers[i].mlp.gate.bias.data[1] = -1.0e9
    attach_router_bias(mat, bias)
    after = _logits(shared)
    assert not torch.allclose(after, before, atol=1e-3)
    torch.testing.assert_close(after, _logits(mat), rtol=0, atol=2e-5)
