"""Grouped SwiGLU expert kernel (Triton, interpreted on CPU) vs the torch and float64 references."""

from __future__ import annotations

import pytest
import torch
from transformers.models.flex_olmo.configuration_flex_olmo import FlexOlmoConfig
from transformers.models.flex_olmo.modeling_flex_olmo import FlexOlmoSparseMoeBlock
from transformers.models.mixtral.configuration_mixtral import MixtralConfig
from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

from serve.kernels import fused_experts, fused_experts_reference, route
from serve.kernels.triton_experts import ExpertConfig, fused_experts_triton, pick_config

# Error bound relative to the largest output magnitude: a few units in the last place of the
# dtype (bf16 has 8 significant bits, fp16 11, fp32 24); measured worst cases were about a third.
TOL = {torch.float32: 5e-6, torch.bfloat16: 1.6e-2, torch.float16: 2e-3}
DTYPES = list(TOL)


def _problem(
    seed: int, tokens: int, experts: int, top_k: int, hidden: int, inter: int
) -> tuple[torch.Tensor, ...]:
    """Float32 activations and weights scaled so outputs are O(1); routing of random logits."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, hidden, generator=gen)
    w13 = torch.randn(experts, 2 * inter, hidden, generator=gen) / hidden**0.5
    w2 = torch.randn(experts, hidden, inter, generator=gen) / inter**0.5
    logits = torch.randn(tokens, experts, generator=gen)
    weights, ids = route(logits, top_k, variant="mixtral", backend="torch")
    return x, w13, w2, weights, ids


def _assert_within(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> None:
    scale = ref.abs().max().item()
    torch.testing.assert_close(
        out.double(), ref.double(), rtol=TOL[dtype], atol=TOL[dtype] * scale, check_dtype=False
    )


# (tokens, experts, top_k, hidden, inter): token counts that are not multiples of BLOCK_M (16),
# k == E, dims that are not multiples of the tiles (hidden 80, inter 72), experts left unused.
SHAPES = [
    (1, 8, 2, 64, 64),
    (37, 8, 2, 128, 96),
    (70, 4, 4, 64, 256),
    (23, 8, 8, 80, 72),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("tokens", "experts", "top_k", "hidden", "inter"), SHAPES)
def test_triton_matches_references(
    dtype: torch.dtype, tokens: int, experts: int, top_k: int, hidden: int, inter: int
) -> None:
    x, w13, w2, weights, ids = _problem(tokens + inter, tokens, experts, top_k, hidden, inter)
    x, w13, w2 = x.to(dtype), w13.to(dtype), w2.to(dtype)
    out = fused_experts(x, w13, w2, weights, ids, backend="triton")
    ref = fused_experts(x, w13, w2, weights, ids, backend="torch")
    exact = fused_experts_reference(x, w13, w2, weights, ids, compute_dtype=torch.float64)
    assert out.dtype == dtype and out.shape == (tokens, hidden)
    _assert_within(out, ref, dtype)
    _assert_within(out, exact, dtype)
    _assert_within(ref, exact, dtype)


@pytest.mark.parametrize("align", ["torch", "triton"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_poisoned_buffers_fully_written(dtype: torch.dtype, align: str) -> None:
    tokens, experts, top_k, hidden, inter = 37, 8, 3, 64, 96
    x, w13, w2, weights, ids = _problem(1, tokens, experts, top_k, hidden, inter)
    x, w13, w2 = x.to(dtype), w13.to(dtype), w2.to(dtype)
    nan = float("nan")
    act = torch.full((tokens * top_k, inter), nan, dtype=dtype)
    rows = torch.full((tokens * top_k, hidden), nan)
    out = torch.full((tokens, hidden), nan, dtype=dtype)
    result = fused_experts_triton(
        x, w13, w2, weights, ids, act_out=act, rows_out=rows, out=out, align=align
    )
    assert result.data_ptr() == out.data_ptr()
    assert not act.isnan().any() and not rows.isnan().any() and not out.isnan().any()
    _assert_within(out, fused_experts_reference(x, w13, w2, weights, ids), dtype)


def test_other_tile_sizes() -> None:
    """A BLOCK_M that splits experts across several blocks, and tiles larger than the dims."""
    x, w13, w2, weights, ids = _problem(2, 45, 4, 2, 64, 96)
    ref = fused_experts_reference(x, w13, w2, weights, ids)
    configs = (
        ExpertConfig(block_m=16, block_n_gate_up=16, block_n_down=16, block_k=16, group_m=4),
        ExpertConfig(block_m=32, block_n_gate_up=128, block_n_down=32, block_k=128, group_m=2),
    )
    for config in configs:
        out = fused_experts_triton(x, w13, w2, weights, ids, config=config)
        _assert_within(out, ref, torch.float32)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("tokens", [2, 40, 300])
def test_gpu_tile_configs(dtype: torch.dtype, tokens: int) -> None:
    """The tiles chosen for a GPU (decode, middle, prefill) give right results too."""
    x, w13, w2, weights, ids = _problem(tokens, tokens, 2, 1, 64, 64)
    x, w13, w2 = x.to(dtype), w13.to(dtype), w2.to(dtype)
    config = pick_config(tokens, 2, dtype, interpret=False)
    out = fused_experts_triton(x, w13, w2, weights, ids, config=config)
    _assert_within(out, fused_experts_reference(x, w13, w2, weights, ids), dtype)


def test_repeated_expert_in_a_row() -> None:
    """ids not produced by route (an expert twice for a token) still sum both contributions."""
    x, w13, w2, _, _ = _problem(3, 9, 4, 2, 64, 64)
    ids = torch.tensor([[1, 1]] * 9, dtype=torch.int64)  # int64 ids are accepted too
    weights = torch.full((9, 2), 0.5)
    out = fused_experts(x, w13, w2, weights, ids, backend="triton")
    single = fused_experts(x, w13, w2, torch.ones(9, 1), ids[:, :1], backend="torch")
    _assert_within(out, single, torch.float32)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_masked_expert_equals_model_without_it(backend: str) -> None:
    """Routing around expert j gives the output of the MoE whose weights lack expert j."""
    tokens, experts, top_k, hidden, inter = 31, 6, 2, 64, 64
    x, w13, w2, _, _ = _problem(4, tokens, experts, top_k, hidden, inter)
    gen = torch.Generator().manual_seed(4)
    logits = torch.randn(tokens, experts, generator=gen)
    j = 2
    keep = [e for e in range(experts) if e != j]
    mask = torch.ones(tokens, experts, dtype=torch.bool)
    mask[:, j] = False
    w, ids = route(logits, top_k, variant="flexolmo", mask=mask, backend=backend)
    out = fused_experts(x, w13, w2, w, ids, backend=backend)
    w_del, ids_del = route(logits[:, keep], top_k, variant="flexolmo", backend=backend)
    out_del = fused_experts(x, w13[keep], w2[keep], w_del, ids_del, backend=backend)
    torch.testing.assert_close(out, out_del, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("arch", ["flexolmo", "mixtral"])
def test_matches_transformers_moe_block(arch: str) -> None:
    """route + fused_experts reproduce transformers' own sparse MoE blocks (same weight layout)."""
    gen = torch.Generator().manual_seed(6)
    if arch == "flexolmo":
        config = FlexOlmoConfig(
            hidden_size=64, intermediate_size=96, num_experts=4, num_experts_per_tok=2
        )
        block = FlexOlmoSparseMoeBlock(config)
    else:
        config = MixtralConfig(
            hidden_size=64, intermediate_size=96, num_local_experts=4, num_experts_per_tok=2
        )
        block = MixtralSparseMoeBlock(config)
    with torch.no_grad():
        for p in block.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) / p.shape[-1] ** 0.5)
        hidden = torch.randn(1, 19, 64, generator=gen)
        expected = block(hidden)
        if isinstance(expected, tuple):
            expected = expected[0]
        expected = expected.reshape(19, 64)
        logits = hidden.reshape(19, 64) @ block.gate.weight.T
        experts = block.experts
        for backend in ("triton", "torch"):
            w, ids = route(logits, 2, variant=arch, backend=backend)
            out = fused_experts(
                hidden.reshape(19, 64),
                experts.gate_up_proj,
                experts.down_proj,
                w,
                ids,
                backend=backend,
            )
            torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_bad_arguments_raise() -> None:
    x, w13, w2, weights, ids = _problem(5, 4, 4, 2, 64, 64)
    with pytest.raises(ValueError, match="must be contiguous"):
        fused_experts_triton(x, w13, w2, weights, ids, out=torch.empty(64, 4).T)
    with pytest.raises(ValueError, match="dtype mismatch"):
        fused_experts(x.half(), w13, w2, weights, ids, backend="triton")
    with pytest.raises(ValueError, match=r"topk_ids must lie in \[0, 4\)"):
        fused_experts(x, w13, w2, weights, ids + 3, backend="triton")
    with pytest.raises(ValueError, match="w2 must be"):
        fused_experts(x, w13, w2[:, :, :32], weights, ids, backend="triton")


def test_zero_tokens() -> None:
    x, w13, w2, weights, ids = _problem(6, 0, 4, 2, 64, 64)
    assert fused_experts(x, w13, w2, weights, ids, backend="triton").shape == (0, 64)
