"""compose/flexolmo and compose/btx: standard MoE checkpoints built exactly from their inputs."""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable
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
    load_model,
    logits,
    raw_tensors,
    tensors,
    token_ids,
    write_expert_file,
)
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from composer.errors import AnchorMismatchError, PlanError
from composer.inputs import checkpoint_sha256

IDS = token_ids()
FLEX = "name: flex\nmethod: compose\nstyle: flexolmo\nbase: base\nexperts: [code, legal]\n"


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _expert_file(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "composer_expert.safetensors")


@pytest.fixture(scope="module")
def flex(models: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("flex") / "out"
    return build_text(models, out, FLEX + "top_k: 2\n").out_dir


def test_flexolmo_is_a_standard_mixtral(models: Path, flex: Path) -> None:
    cfg = config(flex)
    assert cfg["architectures"] == ["MixtralForCausalLM"] and cfg["model_type"] == "mixtral"
    assert (cfg["num_local_experts"], cfg["num_experts_per_tok"]) == (3, 2)
    assert cfg["composer_experts"] == ["public", "code", "legal"]
    assert cfg["composer_dense_layers"] == []
    for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "vocab_size"):
        assert cfg[k] == config(models / "base")[k]
    # Plain transformers loads it with no missing or unexpected weights, and generates.
    from transformers import MixtralForCausalLM

    model = load_model(flex)
    assert type(model) is MixtralForCausalLM
    with torch.no_grad():
        out = model.generate(IDS[:1, :5], max_new_tokens=4, do_sample=False)
    assert out.shape == (1, 9)


def test_flexolmo_tensors_are_the_inputs_bit_for_bit(models: Path, flex: Path) -> None:
    got = tensors(flex)
    base = raw_tensors(models / "base")
    sources = [base, raw_tensors(models / "code"), raw_tensors(models / "legal")]
    for k, t in base.items():
        if ".mlp." not in k:
            assert bit_equal(got[k], t), k
    for i in range(2):
        for e, src in enumerate(sources):
            for proj, w in PROJ_NAMES.items():
                key = f"model.layers.{i}.block_sparse_moe.experts.{e}.{w}.weight"
                assert bit_equal(got[key], src[f"model.layers.{i}.mlp.{proj}_proj.weight"]), key
    # The experts really differ (the check above could not pass by accident).
    k = "model.layers.1.mlp.up_proj.weight"
    assert not torch.equal(sources[1][k], base[k]) and not torch.equal(sources[2][k], base[k])
    expected = len([k for k in base if ".mlp." not in k]) + 2 * (1 + 3 * 3)
    assert len(got) == expected


def test_flexolmo_router_rows_and_bias(models: Path, flex: Path) -> None:
    got = tensors(flex)
    files = [_expert_file(models / "code"), _expert_file(models / "legal")]
    for i in range(2):
        router = got[f"model.layers.{i}.block_sparse_moe.gate.weight"]
        assert torch.equal(router[0], torch.zeros(HIDDEN))  # no public_calibration
        for e, f in enumerate(files, start=1):
            assert bit_equal(router[e], f[f"model.layers.{i}.domain_embedding"])
    # The negative per-expert bias goes to composer_router.safetensors, never into the weights.
    cfg = config(flex)
    assert cfg["composer_router_file"] == "composer_router.safetensors"
    index = json.loads((flex / "model.safetensors.index.json").read_text())["weight_map"]
    assert "composer_router.safetensors" not in index.values()
    assert not any("router_bias" in k for k in index)
    with safe_open(str(flex / "composer_router.safetensors"), "pt") as f:
        assert f.metadata()["composer_format"] == "composer-router/1"
        assert sorted(f.keys()) == [f"model.layers.{i}.mlp.router_bias" for i in range(2)]
        for i in range(2):
            want = torch.stack(
                [torch.zeros(())] + [g[f"model.layers.{i}.router_bias"] for g in files]
            )
            assert bit_equal(f.get_tensor(f"model.layers.{i}.mlp.router_bias"), want)
            assert bool(torch.all(want[1:] < 0))
    man = json.loads((flex / "composition.json").read_text())
    assert man["extras"]["composer_router.safetensors"] == _sha256(
        flex / "composer_router.safetensors"
    )


def test_flexolmo_manifest_names_every_input(models: Path, flex: Path) -> None:
    man = json.loads((flex / "composition.json").read_text())
    assert (man["method"], man["name"]) == ("compose/flexolmo", "flex")
    assert [(e["index"], e["name"], e["source"]) for e in man["experts"]] == [
        (0, "public", "base"),
        (1, "code", "code"),
        (2, "legal", "legal"),
    ]
    assert man["base"]["sha256"] == checkpoint_sha256(models / "base")
    assert man["experts"][1]["sha256"] == checkpoint_sha256(models / "code")
    assert man["experts"][2]["kind"] == "ffn"  # carries composer_expert.safetensors
    assert man["parameters"]["norm_topk_prob"] is True  # Mixtral always renormalises
    assert man["parameters"]["router_init"] == "domain_embedding"
    for name, sha in man["files"].items():
        assert _sha256(flex / name) == sha, name


@pytest.mark.parametrize(
    ("init", "picks"), [("domain_embedding", "beacon_expert"), ("trained", "beacon")]
)
def test_top1_router_that_always_picks_one_model_reproduces_it(
    models: Path, tmp_path: Path, init: str, picks: str
) -> None:
    """Base 'beacon' has a residual dimension that is positive on every token; the expert's
    domain embedding is +4 there and its router row -4 (the public row is zero). With top-1 and
    Mixtral's renormalisation the chosen expert's weight is exactly 1, so the composition is
    the chosen model: the expert with `init: domain_embedding`, the public one with `trained`."""
    text = (
        "method: compose\nstyle: flexolmo\nbase: beacon\nexperts: [beacon_expert]\ntop_k: 1\n"
        f"router:\n  init: {init}\n"
    )
    out = build_text(models, tmp_path / "out", text).out_dir
    got = logits(out, IDS)
    want = logits(models / picks, IDS)
    other = logits(models / ("beacon" if picks == "beacon_expert" else "beacon_expert"), IDS)
    assert (want - other).abs().max() > 1e-3  # the two models are distinguishable
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


def test_public_calibration_row_is_the_mean_ffn_input(models: Path, tmp_path: Path) -> None:
    text = FLEX + f"router:\n  public_calibration: [{models / 'cal' / 'manuals.txt'}]\n"
    out = build_text(models, tmp_path / "out", text).out_dir
    got = tensors(out)
    x = ffn_inputs(models / "base", CAL_TEXT["manuals"])
    code = _expert_file(models / "code")
    for i in range(2):
        router = got[f"model.layers.{i}.block_sparse_moe.gate.weight"]
        torch.testing.assert_close(router[0], x[i].mean(dim=0), rtol=0, atol=1e-5)
        assert bit_equal(router[1], code[f"model.layers.{i}.domain_embedding"])


def test_trained_rows_and_dropping_the_bias(models: Path, tmp_path: Path) -> None:
    text = FLEX + "router:\n  init: trained\n  expert_bias: false\n"
    out = build_text(models, tmp_path / "out", text).out_dir
    got = tensors(out)
    legal = _expert_file(models / "legal")
    assert bit_equal(
        got["model.layers.1.block_sparse_moe.gate.weight"][2], legal["model.layers.1.router_row"]
    )
    assert not (out / "composer_router.safetensors").exists()
    assert "composer_router_file" not in config(out)
    assert json.loads((out / "composition.json").read_text())["extras"] == {}


def test_flexolmo_on_olmo2_base(models: Path, tmp_path: Path) -> None:
    text = (
        "method: compose\nstyle: flexolmo\nbase: olmo\nexperts: [olmo_code, olmo_legal]\ntop_k: 2\n"
    )
    out = build_text(models, tmp_path / "out", text).out_dir
    cfg = config(out)
    assert cfg["architectures"] == ["FlexOlmoForCausalLM"] and cfg["model_type"] == "flex_olmo"
    assert (cfg["num_experts"], cfg["num_experts_per_tok"]) == (3, 2)
    assert cfg["norm_topk_prob"] is False  # FlexOlmo's own choice
    assert cfg["composer_experts"] == ["public", "olmo_code", "olmo_legal"]
    got = tensors(out)
    srcs = [raw_tensors(models / n) for n in ("olmo", "olmo_code", "olmo_legal")]
    for k, t in srcs[0].items():
        if ".mlp." not in k:
            assert bit_equal(got[k], t), k
    for e, src in enumerate(srcs):
        for p in ("gate", "up", "down"):
            key = f"model.layers.0.mlp.experts.{e}.{p}_proj.weight"
            assert bit_equal(got[key], src[f"model.layers.0.mlp.{p}_proj.weight"]), key
    model = load_model(out)
    assert type(model).__name__ == "FlexOlmoForCausalLM"
    assert model.config.norm_topk_prob is False
    with torch.no_grad():
        assert torch.isfinite(model(IDS).logits).all()


def test_flexolmo_dense_layers_without_renormalisation_are_exact(
    models: Path, tmp_path: Path
) -> None:
    """No MoE layer: every layer holds E copies of the public FFN behind a zero router; FlexOlmo
    weighs them by top_k / E, which the E / top_k-scaled down_proj undoes: the public model."""
    text = (
        "method: compose\nstyle: flexolmo\nbase: olmo\nexperts: [olmo_code, olmo_legal]\n"
        "top_k: 2\nmoe_layers: []\n"
    )
    out = build_text(models, tmp_path / "out", text).out_dir
    assert config(out)["composer_dense_layers"] == [0, 1]
    torch.testing.assert_close(logits(out, IDS), logits(models / "olmo", IDS), rtol=0, atol=1e-5)


def test_btx_averages_shared_weights_and_keeps_expert_ffns(models: Path, tmp_path: Path) -> None:
    text = (
        "method: compose\nstyle: btx\nbase: base\n"
        "experts:\n  - {ref: ft1, name: one, weight: 3}\n  - {ref: ft2, name: two}\ntop_k: 1\n"
    )
    out = build_text(models, tmp_path / "out", text).out_dir
    cfg = config(out)
    assert cfg["architectures"] == ["MixtralForCausalLM"]
    assert cfg["composer_experts"] == ["one", "two"] and cfg["num_local_experts"] == 2
    got = tensors(out)
    a, b = raw_tensors(models / "ft1"), raw_tensors(models / "ft2")
    for k in a:
        if ".mlp." not in k:
            torch.testing.assert_close(got[k], 0.75 * a[k] + 0.25 * b[k], rtol=1e-6, atol=1e-7)
            assert not torch.equal(a[k], b[k]) or "norm" in k
    for i in range(2):
        for e, src in enumerate((a, b)):
            for proj, w in PROJ_NAMES.items():
                key = f"model.layers.{i}.block_sparse_moe.experts.{e}.{w}.weight"
                assert bit_equal(got[key], src[f"model.layers.{i}.mlp.{proj}_proj.weight"]), key
    man = json.loads((out / "composition.json").read_text())
    assert man["method"] == "compose/btx"
    assert [(e["name"], e["source"]) for e in man["experts"]] == [("one", "one"), ("two", "two")]
    load_model(out)


def test_btx_without_moe_layers_is_the_averaged_dense_model(models: Path, tmp_path: Path) -> None:
    text = (
        "method: compose\nstyle: btx\nbase: base\nexperts: [{ref: ft1, weight: 1}, ft2]\n"
        "moe_layers: []\n"
    )
    out = build_text(models, tmp_path / "out", text).out_dir
    avg_dir = tmp_path / "avg"
    shutil.copytree(models / "ft1", avg_dir)
    a, b = raw_tensors(models / "ft1"), raw_tensors(models / "ft2")
    save_file({k: (a[k] + b[k]) / 2 for k in a}, avg_dir / "model.safetensors", {"format": "pt"})
    want = logits(avg_dir, IDS)
    torch.testing.assert_close(logits(out, IDS), want, rtol=0, atol=1e-5)
    assert (want - logits(models / "ft1", IDS)).abs().max() > 1e-3


def _copy_with(src: Path, dst: Path, edit: Callable[[dict[str, torch.Tensor]], object]) -> Path:
    shutil.copytree(src, dst)
    sd = load_file(dst / "model.safetensors")
    edit(sd)
    save_file(sd, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


def test_anchor_mismatch_names_expert_and_tensor(models: Path, tmp_path: Path) -> None:
    key = "model.layers.1.self_attn.q_proj.weight"

    def nudge(sd: dict[str, torch.Tensor]) -> None:
        sd[key] = sd[key].clone()
        sd[key][3, 5] += 1e-3  # one element off: still refused

    drifted = _copy_with(models / "code", tmp_path / "drifted", nudge)
    text = (
        "method: compose\nstyle: flexolmo\nbase: base\n"
        f"experts: [legal, {{ref: {drifted}, name: drifted}}]\n"
    )
    with pytest.raises(AnchorMismatchError) as exc:
        build_text(models, tmp_path / "out", text)
    msg = str(exc.value)
    assert "expert 'drifted'" in msg and key in msg and "not anchored" in msg
    assert not (tmp_path / "out").exists()
    assert not list(tmp_path.glob(".out.tmp-*"))


def test_anchor_missing_or_extra_shared_tensor(models: Path, tmp_path: Path) -> None:
    _copy_with(models / "code", tmp_path / "lacks", lambda sd: sd.pop("model.norm.weight"))
    _copy_with(
        models / "code",
        tmp_path / "extra",
        lambda sd: sd.__setitem__("model.layers.0.self_attn.q_norm.weight", torch.ones(HIDDEN)),
    )
    head = f"method: compose\nstyle: flexolmo\nbase: {models / 'base'}\n"
    with pytest.raises(
        AnchorMismatchError, match=r"expert 'lacks' lacks the shared tensor model.norm.weight"
    ):
        build_text(models, tmp_path / "o1", head + f"experts: [{tmp_path / 'lacks'}]\n")
    with pytest.raises(
        AnchorMismatchError,
        match=r"expert 'extra' has a shared tensor the public model lacks: "
        r"model.layers.0.self_attn.q_norm.weight",
    ):
        build_text(models, tmp_path / "o2", head + f"experts: [{tmp_path / 'extra'}]\n")


def test_flexolmo_refuses_full_finetunes(models: Path, tmp_path: Path) -> None:
    """Full fine-tunes (the btx inputs) are not anchored to the public model."""
    text = "method: compose\nstyle: flexolmo\nbase: base\nexperts: [ft1]\nrouter: {init: random}\n"
    with pytest.raises(AnchorMismatchError, match=r"expert 'ft1' is not anchored"):
        build_text(models, tmp_path / "out", text)


def test_btx_refuses_a_different_tensor_shape(models: Path, tmp_path: Path) -> None:
    key = "model.layers.1.self_attn.k_proj.weight"
    _copy_with(
        models / "ft2", tmp_path / "odd", lambda sd: sd.__setitem__(key, torch.zeros(64, HIDDEN))
    )
    text = f"method: compose\nstyle: btx\nbase: base\nexperts: [ft1, {tmp_path / 'odd'}]\n"
    with pytest.raises(PlanError, match=rf"expert 'odd': {key} has shape \(64, 128\)"):
        build_text(models, tmp_path / "out", text)


@pytest.mark.parametrize("base", ["base", "olmo"])
def test_composing_identical_copies_of_the_public_model_is_the_public_model(
    models: Path, tmp_path: Path, base: str
) -> None:
    """Experts that are exact copies of the public FFN, behind any router (random rows, the
    negative bias applied): the MoE computes the dense public model. Mixtral renormalises the
    top-k weights (sum 1); FlexOlmo's OLMo-2 default does not, so it is composed with top_k = E."""
    from router_train.biased_router import load_composed

    copies = []
    for i in (1, 2):
        folder = tmp_path / f"copy{i}"
        shutil.copytree(models / base, folder)
        write_expert_file(folder, layers=[0, 1], seed=30 + i, bias=-2.0 * i)
        copies.append(folder.name)
    top_k = 2 if base == "base" else 3
    spec = (
        f"method: compose\nstyle: flexolmo\nbase: {models / base}\n"
        f"experts: [{', '.join(str(tmp_path / c) for c in copies)}]\ntop_k: {top_k}\n"
    )
    out = build_text(models, tmp_path / "out", spec).out_dir
    assert (out / "composer_router.safetensors").is_file()
    want = logits(models / base, IDS)
    got = load_composed(out)(IDS).logits
    torch.testing.assert_close(got, want, atol=2e-5, rtol=0)
    # Positive control: one expert that is not a copy changes the logits.
    spec_other = spec.replace(
        str(tmp_path / copies[1]), str(models / ("code" if base == "base" else "olmo_code"))
    )
    other = build_text(models, tmp_path / "other", spec_other).out_dir
    assert not torch.allclose(load_composed(other)(IDS).logits, want, atol=1e-3)
