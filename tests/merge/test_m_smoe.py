"""M-SMoE on hand cases and end to end on a tiny in-memory Mixtral."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import MixtralConfig, MixtralForCausalLM

from merge.m_smoe import (
    MSMoEParams,
    UniformMergeParams,
    adaptive_expert_counts,
    group_by_router_logits,
    m_smoe_layer,
    m_smoe_state_dict,
    merge_group,
    routing_agreement,
    select_leaders,
    uniform_merge_layer,
    uniform_merge_state_dict,
)
from merge.moe_layer import (
    MoELayer,
    moe_forward,
    moe_layer_prefixes,
    moe_layer_tensors,
    read_moe_layer,
)
from merge.routing_stats import collect_routing_stats, routing_stats_from_logits

DIMS = dict(
    vocab_size=256,
    hidden_size=128,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=2,
    max_position_embeddings=256,
    num_local_experts=4,
    num_experts_per_tok=2,
    tie_word_embeddings=False,
)


def tiny_mixtral(seed: int = 0, **overrides: int) -> MixtralForCausalLM:
    torch.manual_seed(seed)
    return MixtralForCausalLM(MixtralConfig(**{**DIMS, **overrides})).eval()


def calib(n: int = 2, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (2, 24), generator=g) for _ in range(n)]


def random_layer(e: int = 4, i: int = 16, h: int = 8, seed: int = 0) -> MoELayer:
    g = torch.Generator().manual_seed(seed)
    r = [torch.randn(s, generator=g) for s in ((e, h), (e, i, h), (e, i, h), (e, h, i))]
    return MoELayer(*r)


def test_leaders_are_the_most_used() -> None:
    assert select_leaders(torch.tensor([0.1, 0.4, 0.2, 0.3]), 2) == [1, 3]
    assert select_leaders(torch.tensor([0.25, 0.25, 0.25, 0.25]), 2) == [0, 1]


def test_grouping_follows_router_logit_similarity() -> None:
    base = torch.randn(100, 2, generator=torch.Generator().manual_seed(0))
    # Expert 2 behaves like expert 0, expert 3 like expert 1 (up to scale).
    logits = torch.stack([base[:, 0], base[:, 1], 2 * base[:, 0], 0.5 * base[:, 1]], dim=1)
    assert group_by_router_logits(logits, [0, 1]) == [[0, 2], [1, 3]]


def test_adaptive_counts_follow_usage() -> None:
    flat = torch.tensor([0.25, 0.25, 0.25, 0.25])
    peaked = torch.tensor([0.97, 0.01, 0.01, 0.01])
    # Every layer keeps one; the two extra slots go to the evenly used layer.
    assert adaptive_expert_counts([flat, peaked], 4) == [3, 1]


def test_identical_expert_group_merges_to_that_expert() -> None:
    layer = random_layer()
    same = MoELayer(
        layer.router,
        layer.w1[:1].repeat(4, 1, 1),
        layer.w3[:1].repeat(4, 1, 1),
        layer.w2[:1].repeat(4, 1, 1),
    )
    w1, w3, w2 = merge_group(same, [0, 1, 2, 3], torch.tensor([0.1, 0.2, 0.3, 0.4]))
    torch.testing.assert_close(w1, layer.w1[0], rtol=0, atol=1e-6)
    torch.testing.assert_close(w3, layer.w3[0], rtol=0, atol=1e-6)
    torch.testing.assert_close(w2, layer.w2[0], rtol=0, atol=1e-6)


def test_group_of_permuted_copies_merges_to_the_leader() -> None:
    # Without alignment, averaging permuted copies would blur the expert; with it, exact.
    layer = random_layer(e=2)
    perm = torch.randperm(16, generator=torch.Generator().manual_seed(5))
    w1 = torch.stack([layer.w1[0], layer.w1[0][perm]])
    w3 = torch.stack([layer.w3[0], layer.w3[0][perm]])
    w2 = torch.stack([layer.w2[0], layer.w2[0][:, perm]])
    pair = MoELayer(layer.router, w1, w3, w2)
    merged = merge_group(pair, [0, 1], torch.tensor([0.5, 0.5]), align=True)
    torch.testing.assert_close(merged[0], layer.w1[0], rtol=0, atol=1e-6)
    blurred = merge_group(pair, [0, 1], torch.tensor([0.5, 0.5]), align=False)
    assert (blurred[0] - layer.w1[0]).abs().max() > 0.1


def test_frequency_weighting() -> None:
    layer = random_layer(e=2)
    w1, _, _ = merge_group(layer, [0, 1], torch.tensor([3.0, 1.0]), align=False)
    torch.testing.assert_close(w1, 0.75 * layer.w1[0] + 0.25 * layer.w1[1])


def test_routing_stats_match_the_models_router_logits() -> None:
    model = tiny_mixtral()
    batches = calib()
    stats = collect_routing_stats(model, batches)
    assert sorted(stats) == [0, 1]
    out = model(input_ids=batches[0], output_router_logits=True)
    for li in (0, 1):
        assert stats[li].logits.shape == (2 * 2 * 24, 4)
        torch.testing.assert_close(stats[li].logits[:48], out.router_logits[li].float())
        assert stats[li].counts.sum() == 2 * 2 * 24 * 2  # tokens x top-2
        assert float(stats[li].frequency.sum()) == pytest.approx(1.0)


def test_merging_identical_experts_keeps_the_model_function() -> None:
    # All experts equal: any routing gives the same output, so 4 -> 2 must be exact.
    model = tiny_mixtral()
    sd = model.state_dict()
    for key in [k for k in sd if k.endswith(("gate_up_proj", "down_proj"))]:
        sd[key] = sd[key][:1].repeat(4, 1, 1).clone()
    model.load_state_dict(sd)
    batches = calib()
    stats = collect_routing_stats(model, batches)
    new_sd, _ = m_smoe_state_dict(sd, stats, MSMoEParams(num_experts=2), top_k=2)
    small = tiny_mixtral(num_local_experts=2)
    small.load_state_dict(new_sd, strict=True)
    with torch.no_grad():
        torch.testing.assert_close(
            small(input_ids=batches[0]).logits,
            model(input_ids=batches[0]).logits,
            rtol=1e-5,
            atol=1e-5,
        )


def test_m_smoe_end_to_end_4_to_2_from_a_saved_checkpoint(tmp_path: Path) -> None:
    model = tiny_mixtral(seed=1)
    model.save_pretrained(tmp_path / "in")
    sd = load_file(tmp_path / "in" / "model.safetensors")
    assert {layout for _, layout in moe_layer_prefixes(sd).values()} == {"checkpoint"}
    stats = collect_routing_stats(model, calib())
    new_sd, groups = m_smoe_state_dict(sd, stats, MSMoEParams(num_experts=2), top_k=2)
    for li in (0, 1):
        assert sorted(sum(groups[li], [])) == [0, 1, 2, 3]
        assert len(groups[li]) == 2
        layer = read_moe_layer(new_sd, f"model.layers.{li}", "checkpoint")
        assert layer.router.shape == (2, 128)
        assert layer.w1.shape == (2, 64, 128) and layer.w2.shape == (2, 128, 64)
    assert not any(".experts.2." in k or ".experts.3." in k for k in new_sd)
    # Write it as a standard checkpoint (safetensors + config) and load it with transformers.
    out = tmp_path / "out"
    out.mkdir()
    save_file(
        {k: v.contiguous() for k, v in new_sd.items()},
        out / "model.safetensors",
        metadata={"format": "pt"},
    )
    MixtralConfig(**{**DIMS, "num_local_experts": 2}).save_pretrained(out)
    loaded = MixtralForCausalLM.from_pretrained(out).eval()
    # The same weights placed through our own layout adapter give the same model.
    small = tiny_mixtral(num_local_experts=2)
    small.load_state_dict(_to_module_layout(new_sd, small), strict=True)
    ids = calib(1, seed=9)[0]
    with torch.no_grad():
        logits = loaded(input_ids=ids).logits
        assert torch.equal(logits, small(input_ids=ids).logits)
    assert logits.shape == (2, 24, 256) and torch.isfinite(logits).all()


def _to_module_layout(sd: dict[str, torch.Tensor], model: MixtralForCausalLM) -> dict:
    """Checkpoint keys -> the fused keys of the in-memory module (via our adapters)."""
    out = {k: v for k, v in sd.items() if ".block_sparse_moe." not in k}
    for prefix, _ in moe_layer_prefixes(sd).values():
        out.update(moe_layer_tensors(read_moe_layer(sd, prefix, "checkpoint"), prefix, "fused"))
    assert set(out) == set(model.state_dict())
    return out


def test_moe_layer_reference_forward_matches_transformers() -> None:
    model = tiny_mixtral()
    layer = read_moe_layer(model.state_dict(), "model.layers.0", "fused")
    x = torch.randn(10, 128)
    with torch.no_grad():
        ref = model.model.layers[0].mlp(x[None])[0]
    torch.testing.assert_close(moe_forward(layer, x, top_k=2), ref, rtol=1e-5, atol=1e-6)


def test_router_rows_keep_most_tokens_in_their_group() -> None:
    layer = random_layer(e=4, i=16, h=32, seed=2)
    hidden = torch.randn(4000, 32, generator=torch.Generator().manual_seed(3))
    stats = routing_stats_from_logits(hidden @ layer.router.T, top_k=2)
    merged = m_smoe_layer(layer, stats, 2, router="frequency_mean")
    assert routing_agreement(layer, merged, hidden) > 0.7
    leader = m_smoe_layer(layer, stats, 2, router="leader")
    assert torch.equal(leader.layer.router, layer.router[[g[0] for g in leader.groups]])


def test_uniform_baseline_averages_contiguous_blocks() -> None:
    layer = random_layer()
    merged = uniform_merge_layer(layer, 2)
    assert merged.groups == [[0, 1], [2, 3]]
    torch.testing.assert_close(merged.layer.w2[1], (layer.w2[2] + layer.w2[3]) / 2)
    torch.testing.assert_close(merged.layer.router[0], (layer.router[0] + layer.router[1]) / 2)
    sd = tiny_mixtral().state_dict()
    new_sd, groups = uniform_merge_state_dict(sd, UniformMergeParams(num_experts=2))
    assert new_sd["model.layers.1.mlp.experts.gate_up_proj"].shape == (2, 128, 128)
    assert groups[0] == [[0, 1], [2, 3]]


def test_low_rank_compress_option_keeps_a_loadable_dense_checkpoint() -> None:
    model = tiny_mixtral()
    stats = collect_routing_stats(model, calib(1))
    params = MSMoEParams.model_validate({"num_experts": 2, "compress": {"rank": 8}})
    new_sd, _ = m_smoe_state_dict(model.state_dict(), stats, params, top_k=2)
    small = tiny_mixtral(num_local_experts=2)
    small.load_state_dict(new_sd, strict=True)
    w = new_sd["model.layers.0.mlp.experts.down_proj"][0]
    assert torch.linalg.matrix_rank(w) == 8


def test_layout_adapters_round_trip_both_layouts(tmp_path: Path) -> None:
    model = tiny_mixtral()
    fused = model.state_dict()
    model.save_pretrained(tmp_path)
    ckpt = load_file(tmp_path / "model.safetensors")
    for sd, layout in ((fused, "fused"), (ckpt, "checkpoint")):
        prefixes = moe_layer_prefixes(sd)
        assert list(prefixes) == [0, 1] and prefixes[0] == ("model.layers.0", layout)
        layer = read_moe_layer(sd, "model.layers.0", layout)
        for k, v in moe_layer_tensors(layer, "model.layers.0", layout).items():
            assert torch.equal(v, sd[k]), k
    # Both layouts hold the same experts.
    a = read_moe_layer(fused, "model.layers.1", "fused")
    b = read_moe_layer(ckpt, "model.layers.1", "checkpoint")
    for name in ("router", "w1", "w3", "w2"):
        assert torch.equal(getattr(a, name), getattr(b, name))
