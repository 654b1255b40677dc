"""End-to-end expert training on tiny models: learning, the artifact, atomicity, determinism."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import composer.train.artifact as et
from composer.text import TokenChunks
from composer.train.artifact import FORMAT_TAG, read_expert_extras
from composer.train.evaluate import load_causal_lm, perplexity
from composer.train.expert import TrainResult, train_expert
from registry.checkpoint import EXPERT_FILE

STEPS = dict(steps=60, seq_len=32, batch_size=8, lr=1e-3, progress=False)


@pytest.fixture(scope="module")
def trained(
    tiny_llama: Path, pattern_data: TokenChunks, tmp_path_factory: pytest.TempPathFactory
) -> TrainResult:
    out = tmp_path_factory.mktemp("experts") / "arith"
    return train_expert(tiny_llama, pattern_data, out, domain="arith", **STEPS)


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_training_lowers_loss_and_heldout_perplexity(trained: TrainResult) -> None:
    first, last = trained.losses[:10], trained.losses[-10:]
    assert len(trained.losses) == 60
    assert sum(last) / 10 < sum(first) / 10 - 0.5
    # A random 256-token model is near chance (ppl ~256); the expert learns the pattern.
    assert trained.public_ppl > 150
    assert trained.expert_ppl < 0.6 * trained.public_ppl
    assert trained.layers == [0, 1] and trained.heldout_chunks == 16


def test_artifact_shares_every_non_ffn_tensor_bit_for_bit(
    trained: TrainResult, tiny_llama: Path
) -> None:
    public = load_file(tiny_llama / "model.safetensors")
    expert = load_file(trained.out_dir / "model.safetensors")
    assert public.keys() == expert.keys()
    for name, t in public.items():
        assert expert[name].dtype == t.dtype and expert[name].shape == t.shape, name
        if ".mlp." in name:
            assert not torch.equal(expert[name], t), f"{name} was not trained"
        else:
            assert torch.equal(expert[name], t), f"{name} differs from the public model"
    assert (trained.out_dir / "config.json").read_bytes() == (
        tiny_llama / "config.json"
    ).read_bytes()


def test_artifact_extras_round_trip(trained: TrainResult) -> None:
    tensors, meta = read_expert_extras(trained.out_dir)
    assert meta["composer_format"] == FORMAT_TAG
    assert meta["domain"] == "arith" and meta["layers"] == "0,1"
    kinds = {"domain_embedding": (128,), "router_row": (128,), "router_bias": ()}
    kinds["public_router_row"] = (128,)
    assert set(tensors) == {f"model.layers.{i}.{k}" for i in (0, 1) for k in kinds}
    for name, t in tensors.items():
        assert t.dtype == torch.float32 and tuple(t.shape) == kinds[name.rsplit(".", 1)[1]]
        assert torch.isfinite(t).all()
    for i in (0, 1):
        assert torch.equal(tensors[f"model.layers.{i}.public_router_row"], torch.zeros(128))
        # The row trained away from its init (the unit domain direction).
        e = tensors[f"model.layers.{i}.domain_embedding"]
        assert not torch.allclose(tensors[f"model.layers.{i}.router_row"], e / e.norm())


def test_dense_artifact_loads_and_differs_from_public(
    trained: TrainResult, tiny_llama: Path, pattern_data: TokenChunks
) -> None:
    """The folder is a plain checkpoint of the public architecture (transformers loads it)."""
    model = load_causal_lm(trained.out_dir)
    assert type(model).__name__ == "LlamaForCausalLM"
    ppl = perplexity(model, pattern_data.heldout)
    assert ppl != pytest.approx(perplexity(tiny_llama, pattern_data.heldout))


def test_untrained_layers_keep_the_public_ffn(
    tiny_olmo2: Path, pattern_data: TokenChunks, tmp_path: Path
) -> None:
    res = train_expert(
        tiny_olmo2, pattern_data, tmp_path / "e", domain="d", layers=[1], **{**STEPS, "steps": 3}
    )
    public = load_file(tiny_olmo2 / "model.safetensors")
    expert = load_file(res.out_dir / "model.safetensors")
    for name, t in public.items():
        assert torch.equal(expert[name], t) == (".layers.1.mlp." not in name), name
    tensors, meta = read_expert_extras(res.out_dir)
    assert meta["layers"] == "1" and all(k.startswith("model.layers.1.") for k in tensors)


def test_same_seed_same_bytes(
    tiny_llama: Path, pattern_data: TokenChunks, tmp_path: Path, trained: TrainResult
) -> None:
    res = train_expert(tiny_llama, pattern_data, tmp_path / "again", domain="arith", **STEPS)
    assert res.losses == trained.losses
    for f in ("model.safetensors", EXPERT_FILE):
        assert _sha(res.out_dir / f) == _sha(trained.out_dir / f)


def test_failed_write_leaves_nothing_and_keeps_old_artifact(
    tiny_llama: Path, pattern_data: TokenChunks, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "exp"
    kwargs = {**STEPS, "steps": 2}
    train_expert(tiny_llama, pattern_data, out, domain="v1", **kwargs)
    before = {f.name: _sha(f) for f in out.iterdir()}
    with pytest.raises(FileExistsError):
        train_expert(tiny_llama, pattern_data, out, domain="v2", **kwargs)

    real_save = et.save_file

    def failing_save(tensors: dict, path: str, metadata: dict | None = None) -> None:
        if path.endswith(EXPERT_FILE):
            raise OSError("disk full")
        real_save(tensors, path, metadata=metadata)

    monkeypatch.setattr(et, "save_file", failing_save)
    with pytest.raises(OSError, match="disk full"):
        train_expert(tiny_llama, pattern_data, out, domain="v2", overwrite=True, **kwargs)
    with pytest.raises(OSError, match="disk full"):
        train_expert(tiny_llama, pattern_data, tmp_path / "new", domain="v2", **kwargs)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exp"]  # no temp folders, no "new"
    assert {f.name: _sha(f) for f in out.iterdir()} == before

    monkeypatch.setattr(et, "save_file", real_save)
    train_expert(tiny_llama, pattern_data, out, domain="v2", overwrite=True, **kwargs)
    assert read_expert_extras(out)[1]["domain"] == "v2"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exp"]


def test_perplexity_matches_the_models_own_loss(tiny_llama: Path) -> None:
    ids = torch.randint(0, 256, (3, 16), generator=torch.Generator().manual_seed(0))
    model = load_causal_lm(tiny_llama)
    with torch.no_grad():
        loss = model(input_ids=ids, labels=ids).loss
    assert perplexity(tiny_llama, ids) == pytest.approx(torch.exp(loss).item(), rel=1e-5)
    assert perplexity(model, ids.tolist(), batch_size=1) == pytest.approx(
        torch.exp(loss).item(), rel=1e-5
    )


def test_perplexity_on_an_moe_checkpoint(tmp_path: Path) -> None:
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(0)
    cfg = MixtralConfig(
        vocab_size=256,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        num_local_experts=4,
        num_experts_per_tok=2,
    )
    MixtralForCausalLM(cfg).save_pretrained(tmp_path / "moe")
    ppl = perplexity(tmp_path / "moe", torch.randint(0, 256, (2, 16)))
    assert 50 < ppl < 1000  # a random 256-token model is near chance
