"""Dense merges: hand-computed cases, identities, determinism, dtype."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import LlamaConfig, LlamaForCausalLM

from composer.tiny_models import TINY_DIMS, make_tiny_llama, perturb_ffn
from merge import dense
from merge.state_dict import merge_state_dicts

BASE = torch.ones(2, 3)
TAUS = [
    torch.tensor([[3.0, -1.0, 0.5], [-2.0, 4.0, -0.25]]),
    torch.tensor([[-1.0, -3.0, 2.0], [1.0, -0.5, 5.0]]),
    torch.tensor([[-2.0, -0.125, 1.5], [-3.0, -1.0, 0.125]]),
]
EXPERTS = [BASE + t for t in TAUS]


def test_linear_weighted_average_and_sum() -> None:
    a, b = torch.zeros(2), torch.full((2,), 4.0)
    assert torch.equal(dense.linear(None, [a, b], weights=[1.0, 3.0]), torch.full((2,), 3.0))
    out = dense.linear(None, [a, b], weights=[1.0, 3.0], normalize=False)
    assert torch.equal(out, torch.full((2,), 12.0))


def test_task_arithmetic_hand_computed() -> None:
    base = torch.ones(3)
    experts = [torch.full((3,), 2.0), torch.full((3,), 4.0)]
    out = dense.task_arithmetic(base, experts, weights=[1.0, 0.5], lambda_=2.0)
    assert torch.equal(out, torch.full((3,), 1.0 + 2.0 * (1.0 + 1.5)))
    out = dense.task_arithmetic(base, experts, weights=[1.0, 3.0], normalize=True)
    assert torch.equal(out, torch.full((3,), 1.0 + (1.0 + 9.0) / 4.0))


def test_task_arithmetic_lambda_zero_is_base() -> None:
    base = torch.randn(4, 5)
    out = dense.task_arithmetic(base, [torch.randn(4, 5), torch.randn(4, 5)], lambda_=0.0)
    assert torch.equal(out, base)


def test_trim_keeps_top_density_by_magnitude() -> None:
    trimmed = dense.trim_top_density(TAUS[0], 0.5)
    assert torch.equal(trimmed, torch.tensor([[3.0, 0.0, 0.0], [-2.0, 4.0, 0.0]]))


def test_ties_sign_election_on_2x3_example() -> None:
    # Trimmed at density 0.5 (3 of 6 entries):
    #   [[3, 0, 0], [-2, 4, 0]], [[0, -3, 2], [0, 0, 5]], [[-2, 0, 1.5], [-3, 0, 0]]
    # elected signs [[+, -, +], [-, +, +]]; disjoint means over agreeing nonzero entries:
    expected_tau = torch.tensor([[3.0, -3.0, 1.75], [-2.5, 4.0, 5.0]])
    out = dense.ties(BASE, EXPERTS, density=0.5)
    torch.testing.assert_close(out, BASE + expected_tau, rtol=0, atol=1e-6)
    # Without normalize, agreeing entries add up instead; lambda scales the merged vector.
    summed = torch.tensor([[3.0, -3.0, 3.5], [-5.0, 4.0, 5.0]])
    out = dense.ties(BASE, EXPERTS, density=0.5, normalize=False, lambda_=0.5)
    torch.testing.assert_close(out, BASE + 0.5 * summed, rtol=0, atol=1e-6)


def test_ties_weights_move_the_elected_sign() -> None:
    base = torch.zeros(1)
    experts = [torch.tensor([2.0]), torch.tensor([-1.0])]
    assert dense.ties(base, experts, density=1.0).item() == 2.0
    out = dense.ties(base, experts, density=1.0, weights=[1.0, 3.0])
    assert out.item() == -1.0  # weighted sum 2 - 3 < 0: only the second expert agrees


def test_ties_single_model_density_one_is_that_model() -> None:
    base, expert = torch.randn(8, 8), torch.randn(8, 8)
    out = dense.ties(base, [expert], density=1.0, lambda_=1.0)
    torch.testing.assert_close(out, expert, rtol=0, atol=1e-6)


def test_dare_is_seeded() -> None:
    base = torch.zeros(64, 64)
    experts = [torch.randn(64, 64), torch.randn(64, 64)]
    a = dense.dare_linear(base, experts, density=0.3, seed=7, name="w")
    b = dense.dare_linear(base, experts, density=0.3, seed=7, name="w")
    c = dense.dare_linear(base, experts, density=0.3, seed=8, name="w")
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert torch.equal(
        dense.dare_ties(base, experts, density=0.3, seed=7, name="w"),
        dense.dare_ties(base, experts, density=0.3, seed=7, name="w"),
    )


def test_dare_drops_and_rescales() -> None:
    tau = torch.ones(200_000)
    out = dense.dare_sparsify(tau, 0.25, torch.Generator().manual_seed(0))
    kept = out != 0
    assert torch.all(out[kept] == 4.0)  # survivors rescaled by 1 / density
    assert abs(kept.float().mean().item() - 0.25) < 0.005
    assert abs(out.mean().item() - 1.0) < 0.02  # unbiased


def test_dare_density_one_reduces_to_task_arithmetic_and_ties() -> None:
    base = torch.randn(5, 7)
    experts = [torch.randn(5, 7) for _ in range(3)]
    assert torch.equal(
        dense.dare_linear(base, experts, density=1.0, lambda_=0.7),
        dense.task_arithmetic(base, experts, lambda_=0.7),
    )
    assert torch.equal(
        dense.dare_ties(base, experts, density=1.0), dense.ties(base, experts, density=1.0)
    )


def test_compute_in_float32_return_base_dtype() -> None:
    base = torch.ones(4, dtype=torch.bfloat16)
    experts = [torch.full((4,), 1.5, dtype=torch.bfloat16)] * 2
    for fn in (dense.task_arithmetic, dense.ties, dense.dare_ties, dense.dare_linear):
        kwargs = {} if fn is dense.task_arithmetic else {"density": 1.0}
        out = fn(base, experts, **kwargs)
        assert out.dtype == torch.bfloat16


@pytest.mark.parametrize(
    "method", ["linear", "task_arithmetic", "ties", "dare_linear", "dare_ties"]
)
def test_state_dict_helper_merges_floats_and_copies_the_rest(method: str) -> None:
    base = {"w": torch.zeros(3, 3), "step": torch.tensor([5])}
    experts = [{"w": torch.full((3, 3), 2.0), "step": torch.tensor([5])} for _ in range(2)]
    params = {} if method in ("linear", "task_arithmetic") else {"density": 1.0}
    out = merge_state_dicts(method, base, experts, {**params, "weight": [0.5, 0.5]})
    assert set(out) == {"w", "step"}
    assert torch.equal(out["step"], base["step"])
    # Two experts at 2 with weights 0.5: average 2 (linear, normalised TIES), 0 + 0.5*2 + 0.5*2
    # (task arithmetic and DARE-linear at density 1).
    torch.testing.assert_close(out["w"], torch.full((3, 3), 2.0), rtol=0, atol=1e-6)


def test_state_dict_helper_accepts_lambda_alias() -> None:
    base = {"w": torch.zeros(2)}
    experts = [{"w": torch.ones(2)}]
    out = merge_state_dicts("task_arithmetic", base, experts, {"lambda": 0.25})
    assert torch.equal(out["w"], torch.full((2,), 0.25))


@pytest.mark.parametrize("method", ["ties", "task_arithmetic", "dare_ties"])
def test_disjoint_experts_on_real_checkpoints(method: str, tmp_path: Path) -> None:
    # Two FlexOlmo-style experts that changed different layers' FFNs: every entry has at most
    # one nonzero task vector, so these merges give each layer its own expert's weights.
    make_tiny_llama(tmp_path / "base")
    for i in range(2):
        perturb_ffn(tmp_path / "base", tmp_path / f"e{i}", seed=i + 1, layers=[i])
    base = load_file(tmp_path / "base" / "model.safetensors")
    experts = [load_file(tmp_path / f"e{i}" / "model.safetensors") for i in range(2)]
    params = {} if method == "task_arithmetic" else {"density": 1.0}
    merged = merge_state_dicts(method, base, experts, params)
    for name, t in merged.items():
        owner = 0 if "layers.0.mlp" in name else 1 if "layers.1.mlp" in name else None
        want = base[name] if owner is None else experts[owner][name]
        torch.testing.assert_close(t, want, rtol=0, atol=1e-6)
    model = LlamaForCausalLM(LlamaConfig(**TINY_DIMS))
    model.load_state_dict(merged, strict=True)
    logits = model(input_ids=torch.tensor([[1, 2, 3]])).logits
    assert torch.isfinite(logits).all()
