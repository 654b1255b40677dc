"""Fused routing kernel (Triton, interpreted on CPU) against the torch and float64 references."""

from __future__ import annotations

import pytest
import torch
from transformers.models.flex_olmo.configuration_flex_olmo import FlexOlmoConfig
from transformers.models.flex_olmo.modeling_flex_olmo import FlexOlmoTopKRouter
from transformers.models.mixtral.configuration_mixtral import MixtralConfig
from transformers.models.mixtral.modeling_mixtral import MixtralTopKRouter

from serve.kernels import route, route_reference
from serve.kernels.triton_routing import route_triton

VARIANTS = ("flexolmo", "mixtral")
# (tokens, experts, top_k): token counts that are not multiples of the block, k == E, E not 2^n.
SHAPES = [(1, 4, 1), (37, 8, 2), (70, 8, 8), (23, 6, 3), (19, 64, 8)]


def _random_mask(gen: torch.Generator, tokens: int, experts: int, top_k: int) -> torch.Tensor:
    """Random mask with at least top_k allowed experts per row."""
    mask = torch.rand(tokens, experts, generator=gen) < 0.6
    keep = torch.rand(tokens, experts, generator=gen).argsort(dim=1)[:, :top_k]
    mask.scatter_(1, keep, True)
    return mask


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize(("tokens", "experts", "top_k"), SHAPES)
@pytest.mark.parametrize("use_mask", [False, True])
@pytest.mark.parametrize("use_bias", [False, True])
def test_triton_matches_references(
    variant: str, tokens: int, experts: int, top_k: int, use_mask: bool, use_bias: bool
) -> None:
    gen = torch.Generator().manual_seed(tokens * 1000 + experts * 10 + top_k)
    logits = torch.randn(tokens, experts, generator=gen) * 3
    bias = -torch.rand(experts, generator=gen) if use_bias else None
    mask = _random_mask(gen, tokens, experts, top_k) if use_mask else None
    w, ids = route(logits, top_k, variant=variant, bias=bias, mask=mask, backend="triton")
    w_ref, ids_ref = route(logits, top_k, variant=variant, bias=bias, mask=mask, backend="torch")
    w64, ids64 = route_reference(
        logits, top_k, variant=variant, bias=bias, mask=mask, compute_dtype=torch.float64
    )
    assert w.dtype == torch.float32 and ids.dtype == torch.int32
    assert torch.equal(ids, ids_ref)
    assert torch.equal(ids, ids64)
    torch.testing.assert_close(w, w_ref, rtol=2e-6, atol=1e-7)
    torch.testing.assert_close(w.double(), w64, rtol=2e-6, atol=1e-7)
    if mask is not None:
        assert mask.gather(1, ids.long()).all(), "a masked expert was chosen"
    # Chosen in descending order, and every expert at most once per row.
    assert (w[:, :-1] >= w[:, 1:]).all()
    assert all(len(set(row)) == top_k for row in ids.tolist())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("variant", VARIANTS)
def test_half_precision_logits(dtype: torch.dtype, variant: str) -> None:
    gen = torch.Generator().manual_seed(7)
    logits = (torch.randn(41, 8, generator=gen) * 2).to(dtype)
    w, ids = route(logits, 2, variant=variant, backend="triton")
    w64, ids64 = route_reference(logits, 2, variant=variant, compute_dtype=torch.float64)
    # Half-precision logits tie often; both break ties the same way, on the same exact values.
    assert torch.equal(ids, ids64)
    torch.testing.assert_close(w.double(), w64, rtol=2e-6, atol=1e-7)


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_all_equal_logits_choose_lowest_indices(backend: str, variant: str) -> None:
    tokens, experts, top_k = 21, 8, 3
    logits = torch.full((tokens, experts), 0.25)
    w, ids = route(logits, top_k, variant=variant, backend=backend)
    assert torch.equal(ids, torch.arange(top_k, dtype=torch.int32).expand(tokens, top_k))
    expected = 1 / experts if variant == "flexolmo" else 1 / top_k
    torch.testing.assert_close(w, torch.full((tokens, top_k), expected), rtol=1e-6, atol=0)
    # Under a mask, the lowest *allowed* indices win.
    mask = torch.zeros(tokens, experts, dtype=torch.bool)
    mask[:, [1, 4, 6, 7]] = True
    w, ids = route(logits, top_k, variant=variant, mask=mask, backend=backend)
    assert torch.equal(ids, torch.tensor([1, 4, 6], dtype=torch.int32).expand(tokens, top_k))
    expected = 1 / 4 if variant == "flexolmo" else 1 / top_k
    torch.testing.assert_close(w, torch.full((tokens, top_k), expected), rtol=1e-6, atol=0)


@pytest.mark.parametrize("variant", VARIANTS)
def test_partial_ties_agree(variant: str) -> None:
    """Logits drawn from three values: many ties, in varying positions."""
    gen = torch.Generator().manual_seed(3)
    logits = torch.randint(0, 3, (70, 8), generator=gen).float()
    mask = _random_mask(gen, 70, 8, 4)
    w, ids = route(logits, 4, variant=variant, mask=mask, backend="triton")
    w_ref, ids_ref = route(logits, 4, variant=variant, mask=mask, backend="torch")
    assert torch.equal(ids, ids_ref)
    torch.testing.assert_close(w, w_ref, rtol=2e-6, atol=1e-7)
    # Among equal chosen values, ids increase.
    chosen = logits.gather(1, ids.long())
    same = chosen[:, :-1] == chosen[:, 1:]
    assert (ids[:, :-1] < ids[:, 1:])[same].all()


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_one_allowed_expert(backend: str, variant: str) -> None:
    gen = torch.Generator().manual_seed(5)
    logits = torch.randn(17, 8, generator=gen)
    allowed = torch.randint(0, 8, (17,), generator=gen)
    mask = torch.nn.functional.one_hot(allowed, 8).bool()
    w, ids = route(logits, 1, variant=variant, mask=mask, backend=backend)
    assert torch.equal(ids[:, 0], allowed.int())
    assert torch.equal(w, torch.ones(17, 1))


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_allowed_minus_inf_logit_beats_disallowed(backend: str) -> None:
    """An allowed expert with a -inf logit is still chosen before any disallowed one."""
    logits = torch.tensor([[5.0, float("-inf"), 9.0, 1.0]] * 3)
    mask = torch.tensor([[True, True, False, False]] * 3)
    w, ids = route(logits, 2, variant="flexolmo", mask=mask, backend=backend)
    assert torch.equal(ids, torch.tensor([[0, 1]] * 3, dtype=torch.int32))
    assert torch.equal(w, torch.tensor([[1.0, 0.0]] * 3))


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_top_k_equal_to_experts(backend: str) -> None:
    gen = torch.Generator().manual_seed(11)
    logits = torch.randn(33, 8, generator=gen)
    w, ids = route(logits, 8, variant="flexolmo", backend=backend)
    assert torch.equal(ids.long(), torch.sort(logits, dim=1, descending=True, stable=True).indices)
    torch.testing.assert_close(w.sum(dim=1), torch.ones(33), rtol=1e-6, atol=0)
    torch.testing.assert_close(w, torch.softmax(logits, 1).gather(1, ids.long()))
    # With k == E, mixtral's softmax over the chosen is the softmax over all experts.
    w_mix, ids_mix = route(logits, 8, variant="mixtral", backend=backend)
    assert torch.equal(ids_mix, ids)
    torch.testing.assert_close(w_mix, w, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_masked_expert_equals_expert_deleted(backend: str, variant: str) -> None:
    """Masking expert j routes exactly as a model built without expert j (ids above j shift)."""
    gen = torch.Generator().manual_seed(13)
    tokens, experts, top_k = 45, 8, 2
    logits = torch.randn(tokens, experts, generator=gen)
    bias = -torch.rand(experts, generator=gen)
    for j in (0, 3, experts - 1):
        mask = torch.ones(tokens, experts, dtype=torch.bool)
        mask[:, j] = False
        w, ids = route(logits, top_k, variant=variant, bias=bias, mask=mask, backend=backend)
        keep = [e for e in range(experts) if e != j]
        w_del, ids_del = route(
            logits[:, keep], top_k, variant=variant, bias=bias[keep], backend=backend
        )
        assert torch.equal(ids, torch.tensor(keep, dtype=torch.int32)[ids_del.long()])
        # Same maths; only the order of the softmax's float32 sum may differ.
        torch.testing.assert_close(w, w_del, rtol=3e-7, atol=0)


def test_matches_transformers_routers() -> None:
    """Unmasked, unbiased routing equals the routers of transformers' FlexOlmo and Mixtral."""
    gen = torch.Generator().manual_seed(17)
    hidden = torch.randn(29, 64, generator=gen)
    flex = FlexOlmoTopKRouter(
        FlexOlmoConfig(hidden_size=64, num_experts=8, num_experts_per_tok=2, norm_topk_prob=False)
    )
    mix = MixtralTopKRouter(
        MixtralConfig(hidden_size=64, num_local_experts=8, num_experts_per_tok=2)
    )
    for router, variant in ((flex, "flexolmo"), (mix, "mixtral")):
        with torch.no_grad():
            router.weight.copy_(torch.randn(8, 64, generator=gen) / 8)
            logits, hf_w, hf_ids = router(hidden)
        for backend in ("triton", "torch"):
            w, ids = route(logits, 2, variant=variant, backend=backend)
            assert torch.equal(ids.long(), hf_ids)
            torch.testing.assert_close(w, hf_w.float(), rtol=2e-6, atol=1e-7)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_fully_masked_row_raises_before_launch(backend: str) -> None:
    logits = torch.randn(6, 4)
    mask = torch.ones(6, 4, dtype=torch.bool)
    mask[3] = False
    with pytest.raises(ValueError, match="token row 3 is fully masked"):
        route(logits, 1, variant="flexolmo", mask=mask, backend=backend)
    mask[3, 2] = True
    mask[5, 1:] = False
    with pytest.raises(ValueError, match="token row 3 allows only 1 experts, but top_k=2"):
        route(logits, 2, variant="mixtral", mask=mask, backend=backend)
    with pytest.raises(ValueError, match="top_k=5"):
        route(logits, 5, variant="mixtral", backend=backend)


def test_bad_arguments_raise() -> None:
    logits = torch.randn(4, 8)
    with pytest.raises(ValueError, match="mask must be torch.bool"):
        route(logits, 2, variant="flexolmo", mask=torch.ones(4, 8), backend="triton")
    with pytest.raises(ValueError, match="bias must be"):
        route(logits, 2, variant="flexolmo", bias=torch.zeros(7), backend="triton")
    with pytest.raises(ValueError, match="unknown routing variant"):
        route(logits, 2, variant="softmax", backend="triton")  # type: ignore[arg-type]


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("tokens", [1, 37, 70])
def test_poisoned_outputs_fully_written(variant: str, tokens: int) -> None:
    gen = torch.Generator().manual_seed(tokens)
    logits = torch.randn(tokens, 8, generator=gen)
    mask = _random_mask(gen, tokens, 8, 3)
    weights = torch.full((tokens, 3), float("nan"))
    ids = torch.full((tokens, 3), -1, dtype=torch.int32)
    route_triton(logits, 3, softmax_over_chosen=variant == "mixtral", mask=mask, out=(weights, ids))
    assert torch.isfinite(weights).all() and (ids >= 0).all()
    w_ref, ids_ref = route_reference(logits, 3, variant=variant, mask=mask)
    assert torch.equal(ids, ids_ref)
    torch.testing.assert_close(weights, w_ref, rtol=2e-6, atol=1e-7)


def test_strided_logits() -> None:
    """Logits that are a column slice of a wider tensor (row stride != E)."""
    wide = torch.randn(29, 16, generator=torch.Generator().manual_seed(23))
    logits = wide[:, 3:11]
    w, ids = route(logits, 2, variant="flexolmo", backend="triton")
    w_ref, ids_ref = route(logits.contiguous(), 2, variant="flexolmo", backend="torch")
    assert torch.equal(ids, ids_ref)
    torch.testing.assert_close(w, w_ref, rtol=2e-6, atol=1e-7)


def test_zero_tokens() -> None:
    w, ids = route(torch.randn(0, 8), 2, variant="mixtral", backend="triton")
    assert w.shape == (0, 2) and ids.shape == (0, 2)


@pytest.mark.slow
@pytest.mark.parametrize("variant", VARIANTS)
def test_matches_vllm_cpu_router(variant: str) -> None:
    """Same ids and weights as vLLM's own CPU softmax router (renormalize == mixtral)."""
    cpu_router = pytest.importorskip("vllm.model_executor.layers.fused_moe.router.cpu_router")
    gen = torch.Generator().manual_seed(19)
    logits = torch.randn(37, 8, generator=gen) * 2
    vllm_w, vllm_ids = cpu_router._softmax_topk(logits, 3, variant == "mixtral")
    # vLLM returns the top-k unsorted: compare as (id -> weight) per row.
    order = vllm_ids.long().argsort(dim=1)
    for backend in ("triton", "torch"):
        w, ids = route(logits, 3, variant=variant, backend=backend)
        mine = ids.long().argsort(dim=1)
        assert torch.equal(ids.gather(1, mine), vllm_ids.gather(1, order))
        torch.testing.assert_close(w.gather(1, mine), vllm_w.gather(1, order), rtol=2e-6, atol=1e-7)
