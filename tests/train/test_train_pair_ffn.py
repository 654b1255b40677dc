"""The 2-expert FlexOlmo layer: exactness at init, routing maths, which parameters train."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from composer.train.evaluate import load_causal_lm
from router_train import FfnInputMeans, PairFFN, init_router_from_domain_embedding
from router_train.domain_embedding import compute_domain_embeddings
from router_train.layers import decoder_layers
from router_train.pair_train import install_pair_ffns

from .conftest import arithmetic_chunks


@pytest.mark.parametrize("public", ["tiny_llama", "tiny_olmo2"])
def test_identical_experts_reproduce_public_logits(
    public: str, request: pytest.FixtureRequest
) -> None:
    """expert 1 == expert 0 and top-2: (p0 + p1) * FFN(x) = FFN(x), so the logits are the public
    model's, whatever the router (here the domain-embedding init on every layer)."""
    public_dir: Path = request.getfixturevalue(public)
    ids = arithmetic_chunks(4, 24, seed=3)
    model = load_causal_lm(public_dir)
    with torch.no_grad():
        ref = model(input_ids=ids).logits
    emb = compute_domain_embeddings(model, ids, [0, 1])
    pairs = install_pair_ffns(model, emb)
    assert all(isinstance(decoder_layers(model)[i].mlp, PairFFN) for i in (0, 1))
    with torch.no_grad():
        w = pairs[0].routing_weights(torch.randn(5, 128))
        out = model(input_ids=ids).logits
    assert (w > 0).all() and (w < 1).all()  # both experts really are mixed
    torch.testing.assert_close(out, ref, rtol=0, atol=2e-5)


def test_top2_output_is_probability_weighted_sum() -> None:
    torch.manual_seed(0)
    f0, f1 = nn.Linear(8, 8), nn.Linear(8, 8)
    row, bias = torch.randn(8), torch.tensor(-0.5)
    pair = PairFFN(f0, f1, expert_row=row, expert_bias=bias)
    x = torch.randn(3, 8)
    p1 = torch.sigmoid(x @ row + bias)[:, None]  # softmax([0, l]) = [1 - s(l), s(l)]
    expected = (1 - p1) * f0(x) + p1 * f1(x)
    torch.testing.assert_close(pair(x), expected, rtol=1e-6, atol=1e-6)


def test_top1_keeps_the_larger_probability_without_renormalising() -> None:
    torch.manual_seed(0)
    f = nn.Linear(8, 8)
    pair = PairFFN(f, expert_row=torch.randn(8), expert_bias=0.0, top_k=1)
    x = torch.randn(64, 8)
    w = pair.routing_weights(x)
    probs = torch.softmax(pair.router_logits(x), dim=-1)
    assert ((w > 0).sum(-1) == 1).all()
    torch.testing.assert_close(w.sum(-1), probs.max(-1).values)
    assert ((w[:, 0] > 0) & (w[:, 1] > 0)).sum() == 0
    assert (w[:, 1] > 0).any() and (w[:, 0] > 0).any()


def test_router_init_is_centred_on_the_domain() -> None:
    """row = e/|e|, bias = -|e|: the mean logit over tokens whose mean is e is exactly 0."""
    torch.manual_seed(0)
    x = torch.randn(1000, 16) + 3.0
    e = x.mean(0)
    row, bias = init_router_from_domain_embedding(e)
    torch.testing.assert_close(row.norm(), torch.tensor(1.0))
    assert bias.item() < 0 and bias.shape == ()
    torch.testing.assert_close((x @ row + bias).mean(), torch.tensor(0.0), atol=1e-4, rtol=0)
    _, b2 = init_router_from_domain_embedding(e, bias_margin=2.0)
    torch.testing.assert_close(b2, bias - 2.0)
    with pytest.raises(ValueError):
        init_router_from_domain_embedding(torch.zeros(16))


def test_only_expert_ffn_row_and_bias_get_gradients(tiny_llama: Path) -> None:
    model = load_causal_lm(tiny_llama)
    ids = arithmetic_chunks(2, 16, seed=4)
    pairs = install_pair_ffns(model, compute_domain_embeddings(model, ids, [1]))
    model(input_ids=ids, labels=ids).loss.backward()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    expected = {
        "model.layers.1.mlp.expert_ffn.gate_proj.weight",
        "model.layers.1.mlp.expert_ffn.up_proj.weight",
        "model.layers.1.mlp.expert_ffn.down_proj.weight",
        "model.layers.1.mlp.expert_row",
        "model.layers.1.mlp.expert_bias",
    }
    assert trainable == expected
    for name, p in model.named_parameters():
        if name in expected:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None, name
    # The public row is a buffer: never a parameter an optimiser could pick up.
    assert "public_row" in dict(pairs[1].named_buffers())
    assert torch.equal(pairs[1].public_row, torch.zeros(128))


def test_ffn_input_means_count_only_masked_tokens() -> None:
    lin = nn.Linear(4, 4)
    xs = [torch.randn(2, 5, 4), torch.randn(3, 5, 4)]
    masks = [torch.rand(2, 5) > 0.3, torch.rand(3, 5) > 0.3]
    masks[0][0, 0] = True
    with FfnInputMeans({7: lin}) as acc:
        for x, m in zip(xs, masks, strict=True):
            acc.set_mask(m)
            lin(x)
    lin(torch.full((1, 4), 1e6))  # after the context: not counted
    expected = torch.cat([xs[0][masks[0]], xs[1][masks[1]]]).mean(0)
    torch.testing.assert_close(acc.means()[7], expected)
    with pytest.raises(ValueError):
        FfnInputMeans({0: lin}).means()


def test_domain_embedding_equals_mean_of_post_attention_norm(tiny_llama: Path) -> None:
    """Layer 0's FFN input recomputed by hand: norm(h + attn(input_norm(h))), h = embeddings."""
    model = load_causal_lm(tiny_llama)
    ids = arithmetic_chunks(3, 20, seed=5)
    emb = compute_domain_embeddings(model, ids, [0], batch_size=2)
    layer = decoder_layers(model)[0]
    with torch.no_grad():
        h = model.model.embed_tokens(ids)
        pos = torch.arange(ids.shape[1])[None]
        cos_sin = model.model.rotary_emb(h, pos)
        attn, _ = layer.self_attn(
            layer.input_layernorm(h), position_embeddings=cos_sin, attention_mask=None
        )
        x = layer.post_attention_layernorm(h + attn)
    torch.testing.assert_close(emb[0], x.reshape(-1, x.shape[-1]).mean(0), rtol=0, atol=1e-5)
