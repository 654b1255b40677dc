"""`composer expert train --lora R` on tiny models: the expert is the public FFN plus a LoRA delta;
only the factors, router row and bias train; the artifact is a real PEFT adapter (PEFT loads it
and computes the same FFN) plus composer_expert.safetensors; the registry accepts it for its own
base only."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from composer.text import TokenChunks
from composer.tiny_models import make_tiny_llama
from composer.train.artifact import FORMAT_TAG, read_expert_extras
from composer.train.evaluate import load_causal_lm, perplexity
from composer.train.expert import TrainConfig, TrainResult, train_expert
from composer.train.lora_model import load_lora_pair_model
from registry.checkpoint import ADAPTER_CONFIG, ADAPTER_WEIGHTS, EXPERT_FILE, inspect_folder
from registry.compat import BASE_FINGERPRINT_KEY
from registry.errors import CheckpointError
from router_train.domain_embedding import compute_domain_embeddings
from router_train.lora_ffn import LoraLinear
from router_train.pair_train import install_pair_ffns, train_pairs

RANK, ALPHA = 4, 8.0
STEPS = dict(steps=40, seq_len=32, batch_size=8, lr=2e-2, progress=False)


@pytest.fixture(scope="module")
def trained(
    tiny_llama: Path, pattern_data: TokenChunks, tmp_path_factory: pytest.TempPathFactory
) -> TrainResult:
    out = tmp_path_factory.mktemp("lora") / "arith"
    return train_expert(tiny_llama, pattern_data, out, domain="arith", lora_rank=RANK,
                        lora_alpha=ALPHA, **STEPS)  # fmt: skip


def test_lora_training_lowers_loss_and_heldout_perplexity(trained: TrainResult) -> None:
    assert len(trained.losses) == 40
    assert sum(trained.losses[-5:]) / 5 < sum(trained.losses[:5]) / 5 - 0.2
    assert trained.expert_ppl < 0.85 * trained.public_ppl


def test_artifact_is_a_peft_adapter_with_expert_extras(
    trained: TrainResult, tiny_llama: Path
) -> None:
    files = sorted(f.name for f in trained.out_dir.iterdir())
    assert files == [ADAPTER_CONFIG, ADAPTER_WEIGHTS, EXPERT_FILE]
    cfg = json.loads((trained.out_dir / ADAPTER_CONFIG).read_text())
    assert (cfg["peft_type"], cfg["r"], cfg["lora_alpha"]) == ("LORA", RANK, ALPHA)
    assert cfg["base_model_name_or_path"] == tiny_llama.name  # never the owner's local path
    want = [f"model.layers.{i}.mlp.{p}" for i in (0, 1) for p in ("down_proj", "gate_proj",
                                                                    "up_proj")]  # fmt: skip
    assert cfg["target_modules"] == want
    tensors, meta = read_expert_extras(trained.out_dir)
    assert meta["composer_format"] == FORMAT_TAG and meta["expert_kind"] == "lora"
    assert meta[BASE_FINGERPRINT_KEY] == inspect_folder(tiny_llama).fingerprint()
    assert {k.rsplit(".", 1)[1] for k in tensors} == {
        "domain_embedding", "router_row", "router_bias", "public_router_row"}  # fmt: skip
    adapter_bytes = (trained.out_dir / ADAPTER_WEIGHTS).stat().st_size
    assert adapter_bytes < (tiny_llama / "model.safetensors").stat().st_size / 10


def test_peft_loads_the_adapter_and_computes_the_same_ffn(
    trained: TrainResult, tiny_llama: Path
) -> None:
    """PeftModel.from_pretrained on the public model gives, per targeted projection, exactly our
    expert FFN's computation (public weight + scale * B @ A), and the factors trained."""
    from peft import PeftModel

    peft = PeftModel.from_pretrained(load_causal_lm(tiny_llama), str(trained.out_dir)).eval()
    ours = load_lora_pair_model(tiny_llama, trained.out_dir)
    x = torch.randn(3, 5, 128, generator=torch.Generator().manual_seed(0))
    for i in (0, 1):
        expert = ours.model.layers[i].mlp.expert_ffn
        peft_mlp = peft.base_model.model.model.layers[i].mlp
        for proj in ("gate_proj", "up_proj"):
            lin = getattr(expert, proj)
            assert isinstance(lin, LoraLinear) and lin.scale == ALPHA / RANK
            assert lin.lora_B.abs().max() > 0  # trained away from PEFT's zero init
            torch.testing.assert_close(lin(x), getattr(peft_mlp, proj)(x), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(expert(x), peft_mlp(x), rtol=1e-5, atol=1e-6)


def test_artifact_reproduces_the_trained_model(
    trained: TrainResult, tiny_llama: Path, pattern_data: TokenChunks
) -> None:
    """Scored from its files, the expert gives the held-out perplexity training measured."""
    model = load_lora_pair_model(tiny_llama, trained.out_dir)
    assert perplexity(model, pattern_data.heldout) == trained.expert_ppl


def test_only_factors_and_router_train_public_weights_untouched(
    tiny_llama: Path, pattern_data: TokenChunks
) -> None:
    model = load_causal_lm(tiny_llama)
    before = [(n, p, p.detach().clone()) for n, p in model.named_parameters()]
    emb = compute_domain_embeddings(model, pattern_data.train[:8], [0, 1], 8)
    pairs = install_pair_ffns(model, emb, lora=(RANK, ALPHA))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"model.layers.{i}.mlp.{n}" for i in (0, 1) for n in (
        "expert_row", "expert_bias", *(f"expert_ffn.{p}.lora_{h}" for p in (
            "gate_proj", "up_proj", "down_proj") for h in "AB"))}  # fmt: skip
    # The expert's base weights are the public FFN's own tensors, not copies.
    assert pairs[0].expert_ffn.up_proj.base.weight is pairs[0].public_ffn.up_proj.weight
    train_pairs(model, pairs, pattern_data.train, steps=3, batch_size=8, lr=1e-2, router_lr=None,
                warmup_steps=1, grad_clip=1.0, seed=0, progress=False)  # fmt: skip
    for name, p, t in before:
        assert torch.equal(p, t), f"{name} changed"
    assert any(p.abs().max() > 0 for pr in pairs.values() for p in pr.expert_parameters())


def test_registration_accepts_the_adapter_for_its_base_only(
    trained: TrainResult, tiny_llama: Path, tmp_path: Path
) -> None:
    from registry.db import upgrade
    from registry.service import RegistryService

    url = f"sqlite:///{tmp_path / 'registry.db'}"
    upgrade(url)
    service = RegistryService(url, home=tmp_path)
    try:
        service.add_owner("alice")
        service.add_base(tiny_llama, "tiny")
        other_shape = make_tiny_llama(tmp_path / "wide", seed=0, intermediate_size=192)
        same_shape = make_tiny_llama(tmp_path / "same", seed=9)  # same shapes, other weights
        service.add_base(other_shape, "wide")
        service.add_base(same_shape, "same")
        args = dict(owner="alice", domain="arith", kind="lora")
        with pytest.raises(CheckpointError, match="does not fit base tensor"):
            service.add_expert(trained.out_dir, name="a", base="wide", **args)
        with pytest.raises(CheckpointError, match=BASE_FINGERPRINT_KEY):
            service.add_expert(trained.out_dir, name="a", base="same", **args)
        doc = service.add_expert(trained.out_dir, name="a", base="tiny", **args)
    finally:
        service.close()
    assert doc["kind"] == "lora" and doc["lora"]["only_ffn"] and doc["lora"]["rank"] == RANK
    stored = load_file(trained.out_dir / ADAPTER_WEIGHTS)
    assert all(".lora_" in k for k in stored)


def test_alpha_needs_a_rank() -> None:
    with pytest.raises(ValueError, match="needs lora_rank"):
        TrainConfig(domain="d", lora_alpha=8.0)
    assert TrainConfig(domain="d", lora_rank=4).lora() == (4, 8.0)
    assert TrainConfig(domain="d").lora() is None


def test_cli_refuses_alpha_without_lora(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from cli.main import app

    args = ["expert", "train", str(tmp_path), str(tmp_path), "--out", str(tmp_path / "o")]
    res = CliRunner().invoke(app, [*args, "--domain", "d", "--alpha", "8"])
    assert res.exit_code == 2 and res.stdout == ""
    assert res.stderr.splitlines() == [
        "error: --alpha: needs --lora R (alpha scales a LoRA expert)"
    ]


def test_demo_lora_variant_settings() -> None:
    """COMPOSER_DEMO_LORA=1 makes the code owner train a rank-16 LoRA; the default demo none."""
    from composer.demo import LORA_OWNERS, QUICK, settings_from_env

    assert QUICK.lora_rank == 0 and settings_from_env({}).lora_rank == 0
    got = settings_from_env({"COMPOSER_DEMO_LORA": "1"})
    assert got.lora_rank == 16 and LORA_OWNERS == ("code",)
    assert got == type(QUICK)(**{**QUICK.__dict__, "lora_rank": 16})
    both = {"COMPOSER_DEMO_LORA": "1", "COMPOSER_DEMO_LORA_RANK": "8"}
    assert settings_from_env(both).lora_rank == 8


def test_composed_lora_expert_is_the_trained_model(
    trained: TrainResult, tiny_llama: Path, pattern_data: TokenChunks, tmp_path: Path
) -> None:
    """The trained adapter, composed with its public model (N = 1, top-2, routers as trained,
    materialised; `lora: shared` equals it by tests/builds/test_build_lora.py), is the model its
    owner trained. (`lora: shared` was checked the same way once: equal too.)"""
    from composer.build import build
    from composer.inputs import LocalPathResolver
    from composer.spec_load import parse_spec

    spec = parse_spec(
        f"method: compose\nstyle: flexolmo\nbase: {tiny_llama}\nexperts: [{trained.out_dir}]\n"
        f"top_k: 2\nmoe_layers: [0, 1]\nrouter: {{init: trained}}\n"
    )
    out = build(spec, tmp_path / "composed", LocalPathResolver(), progress=False).out_dir
    composed = perplexity(out, pattern_data.heldout)
    assert composed == pytest.approx(trained.expert_ppl, rel=1e-4)
