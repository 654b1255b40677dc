"""Sparse upcycling: identical experts compute exactly the dense function, whatever the router.

Mixtral renormalises the top-k weights (and upcycling an OLMo-2 base defaults to
``norm_topk_prob: true``), so an MoE layer outputs sum_k w_k * FFN(x) with sum_k w_k = 1, i.e.
FFN(x) up to float32 rounding. Layers outside ``moe_layers`` hold copies of the FFN behind a
zero router (FlexOlmo without renormalisation: down_proj scaled by E / top_k).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from build_helpers import (
    CAL_TEXT,
    HIDDEN,
    PROJ_NAMES,
    bit_equal,
    build_text,
    config,
    ffn_inputs,
    logits,
    raw_tensors,
    tensors,
    token_ids,
)
from safetensors.torch import save_file

ATOL = 1e-5
IDS = token_ids()


@pytest.fixture(scope="module")
def dense_logits(models: Path) -> torch.Tensor:
    return logits(models / "base", IDS)


def _router_file(tmp_path: Path, experts: int, layers: list[int]) -> Path:
    gen = torch.Generator().manual_seed(42)
    # Large rows: routing is decisive and differs between tokens (so it is really exercised).
    w = {
        f"model.layers.{i}.router": torch.randn(experts, HIDDEN, generator=gen) * 3 for i in layers
    }
    path = tmp_path / "routers.safetensors"
    save_file(w, path)
    return path


def _cal(models: Path) -> str:
    return "".join(f"    - {models / 'cal' / name}.txt\n" for name in CAL_TEXT)


def _check_experts_are_copies(out: Path, models: Path, moe: list[int], n: int) -> None:
    got, base = tensors(out), raw_tensors(models / "base")
    for k, t in base.items():
        if ".mlp." not in k:
            assert bit_equal(got[k], t), k
    for i in range(2):
        for e in range(n):
            for proj, w in PROJ_NAMES.items():
                key = f"model.layers.{i}.block_sparse_moe.experts.{e}.{w}.weight"
                assert bit_equal(got[key], base[f"model.layers.{i}.mlp.{proj}_proj.weight"]), key
        router = got[f"model.layers.{i}.block_sparse_moe.gate.weight"]
        assert router.shape == (n, HIDDEN)
        assert bool(torch.any(router != 0)) == (i in moe), i  # dense layers: zero router
    assert not any(".mlp." in k for k in got)
    assert len(got) == len([k for k in base if ".mlp." not in k]) + 2 * (1 + 3 * n)


def test_random_router_is_exact_and_seeded(
    models: Path, tmp_path: Path, dense_logits: torch.Tensor
) -> None:
    text = "name: up4\nmethod: upcycle\nbase: base\nnum_experts: 4\ntop_k: 2\nseed: 3\n"
    res = build_text(models, tmp_path / "out", text)
    out = res.out_dir
    _check_experts_are_copies(out, models, [0, 1], 4)
    got = tensors(out)
    gen = torch.Generator().manual_seed(3)  # one generator, layers in order, std = init range
    for i in range(2):
        want = torch.randn(4, HIDDEN, generator=gen, dtype=torch.float32) * 0.02
        assert bit_equal(got[f"model.layers.{i}.block_sparse_moe.gate.weight"], want)
    torch.testing.assert_close(logits(out, IDS), dense_logits, rtol=0, atol=ATOL)

    cfg = config(out)
    assert cfg["architectures"] == ["MixtralForCausalLM"] and cfg["model_type"] == "mixtral"
    assert (cfg["num_local_experts"], cfg["num_experts_per_tok"]) == (4, 2)
    assert cfg["composer_experts"] == ["expert0", "expert1", "expert2", "expert3"]
    assert cfg["composer_dense_layers"] == []
    assert "composer_router_file" not in cfg
    man = json.loads((out / "composition.json").read_text())
    assert man["format"] == "composer-composition/1"
    assert (man["name"], man["method"], man["seed"]) == ("up4", "upcycle", 3)
    assert man["architecture"] == "MixtralForCausalLM"
    assert man["spec_sha256"] == res.spec_sha256
    assert [e["name"] for e in man["experts"]] == cfg["composer_experts"]
    assert {e["source"] for e in man["experts"]} == {"base"}
    assert man["parameters"]["router_init"] == "random"
    assert man["files"] == res.files
    assert man["extras"] == {}


@pytest.mark.parametrize(
    ("moe_layers", "top_k"), [("{every: 2, offset: 1}", 2), ("[0]", 1), ("[]", 3)]
)
def test_dense_layers_are_exact(
    models: Path, tmp_path: Path, dense_logits: torch.Tensor, moe_layers: str, top_k: int
) -> None:
    text = (
        f"method: upcycle\nbase: base\nnum_experts: 3\ntop_k: {top_k}\nmoe_layers: {moe_layers}\n"
    )
    out = build_text(models, tmp_path / "out", text).out_dir
    moe = json.loads(moe_layers.replace("{every: 2, offset: 1}", "[1]"))
    _check_experts_are_copies(out, models, moe, 3)
    assert config(out)["composer_dense_layers"] == [i for i in range(2) if i not in moe]
    torch.testing.assert_close(logits(out, IDS), dense_logits, rtol=0, atol=ATOL)


def test_given_router_is_copied_and_exact(
    models: Path, tmp_path: Path, dense_logits: torch.Tensor
) -> None:
    path = _router_file(tmp_path, 4, [0, 1])
    text = (
        "method: upcycle\nbase: base\nnum_experts: 4\ntop_k: 2\n"
        f"router:\n  init: given\n  weights: {path.name}\n"  # relative to the spec
    )
    out = build_text(models, tmp_path / "out", text).out_dir
    got = tensors(out)
    gen = torch.Generator().manual_seed(42)
    for i in range(2):
        want = torch.randn(4, HIDDEN, generator=gen) * 3
        assert bit_equal(got[f"model.layers.{i}.block_sparse_moe.gate.weight"], want)
    # The routing really varies between tokens, and still the output is the dense model's.
    x = ffn_inputs(models / "base", CAL_TEXT["code"])[0]
    top = (x @ got["model.layers.0.block_sparse_moe.gate.weight"].T).topk(2).indices
    assert len({tuple(sorted(t)) for t in top.tolist()}) > 1
    torch.testing.assert_close(logits(out, IDS), dense_logits, rtol=0, atol=ATOL)


def test_given_router_with_wrong_shape_is_refused(models: Path, tmp_path: Path) -> None:
    from composer.errors import PlanError

    path = _router_file(tmp_path, 3, [0, 1])
    text = (
        f"method: upcycle\nbase: base\nnum_experts: 4\nrouter:\n  init: given\n  weights: {path}\n"
    )
    with pytest.raises(PlanError, match=r"model.layers.0.router has shape \(3, 128\), expected"):
        build_text(models, tmp_path / "out", text)
    assert not (tmp_path / "out").exists()
    path = _router_file(tmp_path, 4, [0])
    with pytest.raises(PlanError, match=r"has no tensor model.layers.1.router"):
        build_text(models, tmp_path / "out", text)


def test_hidden_mean_router_is_the_mean_ffn_input(
    models: Path, tmp_path: Path, dense_logits: torch.Tensor
) -> None:
    text = (
        "method: upcycle\nbase: base\nnum_experts: 3\nexpert_names: [code, legal, manuals]\n"
        f"top_k: 1\nrouter:\n  init: hidden_mean\n  calibration:\n{_cal(models)}"
    )
    res = build_text(models, tmp_path / "out", text)
    got = tensors(res.out_dir)
    inputs = {name: ffn_inputs(models / "base", t) for name, t in CAL_TEXT.items()}
    for i in range(2):
        want = torch.stack([inputs[name][i].mean(dim=0) for name in CAL_TEXT])
        torch.testing.assert_close(
            got[f"model.layers.{i}.block_sparse_moe.gate.weight"], want, rtol=0, atol=1e-5
        )
    assert config(res.out_dir)["composer_experts"] == ["code", "legal", "manuals"]
    torch.testing.assert_close(logits(res.out_dir, IDS), dense_logits, rtol=0, atol=ATOL)


def test_gating_logit_norm_centres_and_scales(
    models: Path, tmp_path: Path, dense_logits: torch.Tensor
) -> None:
    lam = 2.5
    text = (
        "method: upcycle\nbase: base\nnum_experts: 3\ntop_k: 2\n"
        f"router:\n  init: hidden_mean\n  gating_logit_norm: {lam}\n  calibration:\n{_cal(models)}"
    )
    out = build_text(models, tmp_path / "out", text).out_dir
    got = tensors(out)
    inputs = [ffn_inputs(models / "base", t) for t in CAL_TEXT.values()]
    for i in range(2):
        w = got[f"model.layers.{i}.block_sparse_moe.gate.weight"]
        torch.testing.assert_close(w.sum(dim=0), torch.zeros(HIDDEN), rtol=0, atol=1e-5)
        tokens = torch.cat([x[i] for x in inputs])
        std = (tokens @ w.T).std(dim=-1, unbiased=False).mean()
        assert float(std) == pytest.approx(lam, rel=1e-4)
        # Centring is the only shift: the rows are parallel to the centred hidden means.
        means = torch.stack([x[i].mean(dim=0) for x in inputs])
        centred = means - means.mean(dim=0, keepdim=True)
        ratio = (w / centred).flatten()
        torch.testing.assert_close(ratio, ratio.mean().expand_as(ratio), rtol=1e-3, atol=0)
    torch.testing.assert_close(logits(out, IDS), dense_logits, rtol=0, atol=ATOL)


def test_olmo2_base_becomes_flexolmo_and_stays_exact(models: Path, tmp_path: Path) -> None:
    dense = logits(models / "olmo", IDS)
    text = "method: upcycle\nbase: olmo\nnum_experts: 4\ntop_k: 2\nseed: 1\n"
    out = build_text(models, tmp_path / "up", text).out_dir
    cfg = config(out)
    assert cfg["architectures"] == ["FlexOlmoForCausalLM"] and cfg["model_type"] == "flex_olmo"
    assert (cfg["num_experts"], cfg["num_experts_per_tok"], cfg["norm_topk_prob"]) == (4, 2, True)
    got, base = tensors(out), raw_tensors(models / "olmo")
    for e in range(4):
        for p in ("gate", "up", "down"):
            k = f"model.layers.1.mlp.{p}_proj.weight"
            assert bit_equal(got[f"model.layers.1.mlp.experts.{e}.{p}_proj.weight"], base[k])
    torch.testing.assert_close(logits(out, IDS), dense, rtol=0, atol=ATOL)

    # Positive control: without renormalisation the same experts are scaled by the sum of the
    # top-k probabilities (< 1), and the test above would fail.
    off = build_text(models, tmp_path / "off", text + "norm_topk_prob: false\n").out_dir
    assert config(off)["norm_topk_prob"] is False
    assert (logits(off, IDS) - dense).abs().max() > 1e-3

    # ... except in layers without experts: E / top_k-scaled copies behind a zero router.
    dense_only = text + "norm_topk_prob: false\nmoe_layers: []\n"
    out = build_text(models, tmp_path / "dense", dense_only).out_dir
    got = tensors(out)
    down = base["model.layers.0.mlp.down_proj.weight"]
    assert torch.equal(got["model.layers.0.mlp.experts.3.down_proj.weight"], down * 2.0)
    assert torch.equal(got["model.layers.0.mlp.gate.weight"], torch.zeros(4, HIDDEN))
    torch.testing.assert_close(logits(out, IDS), dense, rtol=0, atol=ATOL)


def test_tied_embeddings_stay_tied(models: Path, tmp_path: Path) -> None:
    text = "method: upcycle\nbase: tied\nnum_experts: 2\ntop_k: 1\n"
    out = build_text(models, tmp_path / "out", text).out_dir
    assert "lm_head.weight" not in tensors(out)
    assert config(out)["tie_word_embeddings"] is True
    torch.testing.assert_close(logits(out, IDS), logits(models / "tied", IDS), rtol=0, atol=ATOL)


def test_bfloat16_output(models: Path, tmp_path: Path) -> None:
    text = "method: upcycle\nbase: base\nnum_experts: 2\noutput: {dtype: bfloat16}\n"
    out = build_text(models, tmp_path / "out", text).out_dir
    got, base = tensors(out), raw_tensors(models / "base")
    assert {t.dtype for t in got.values()} == {torch.bfloat16}
    assert config(out)["dtype"] == "bfloat16"
    key = "model.layers.1.block_sparse_moe.experts.1.w2.weight"
    assert torch.equal(got[key], base["model.layers.1.mlp.down_proj.weight"].to(torch.bfloat16))
    assert torch.equal(got["model.norm.weight"], base["model.norm.weight"].bfloat16())


def test_tokenizer_files_are_copied(models: Path, tmp_path: Path) -> None:
    base = tmp_path / "with_tok"
    shutil.copytree(models / "base", base)
    extra = {
        "tokenizer.json": '{"model": "fake"}',
        "tokenizer_config.json": '{"eos_token": "</s>"}',
        "chat_template.jinja": "{{ messages }}",
        "notes.txt": "not a tokenizer file",
    }
    for name, text in extra.items():
        (base / name).write_text(text)
    text = f"method: upcycle\nbase: {base}\nnum_experts: 2\n"
    out = build_text(models, tmp_path / "out", text).out_dir
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        assert (out / name).read_bytes() == (base / name).read_bytes(), name
    assert (out / "generation_config.json").read_bytes() == (
        base / "generation_config.json"
    ).read_bytes()
    assert not (out / "notes.txt").exists()
