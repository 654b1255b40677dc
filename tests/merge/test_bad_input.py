"""Every bad input gives a MergeError naming the tensor, the expert and the parameter."""

from __future__ import annotations

import pytest
import torch

from merge import dense
from merge.errors import MergeError
from merge.low_rank import low_rank_sparse
from merge.m_smoe import MSMoEParams, m_smoe_layer, m_smoe_state_dict, uniform_merge_layer
from merge.moe_layer import MoELayer, read_moe_layer
from merge.routing_stats import RoutingStats, routing_stats_from_logits
from merge.state_dict import merge_state_dicts

B = torch.zeros(2, 3)


def test_expert_with_another_shape_names_tensor_and_expert() -> None:
    with pytest.raises(MergeError, match=r"tensor 'layers.0.w': expert 'code' \(#1\) has shape"):
        dense.ties(
            B,
            [B, torch.zeros(3, 2)],
            density=0.5,
            name="layers.0.w",
            expert_names=["law", "code"],
        )
    with pytest.raises(MergeError, match=r"expert #1 has shape \(3, 2\) but the base has \(2, 3\)"):
        dense.task_arithmetic(B, [B, torch.zeros(3, 2)])


@pytest.mark.parametrize("density", [0.0, -0.1, 1.5, [0.5, 2.0]])
def test_density_outside_0_1(density: float | list[float]) -> None:
    with pytest.raises(MergeError, match=r"tensor 'w': parameter 'density' of expert #\d is"):
        dense.ties(B, [B, B], density=density, name="w")
    with pytest.raises(MergeError, match="parameter 'density'"):
        dense.dare_linear(B, [B, B], density=density, name="w")


def test_density_outside_0_1_in_spec_params() -> None:
    with pytest.raises(
        MergeError, match=r"method 'ties': parameter 'density'.*must be in \(0, 1\]"
    ):
        merge_state_dicts("ties", {"w": B}, [{"w": B}], {"density": 0})


def test_weight_count_and_values() -> None:
    with pytest.raises(MergeError, match="parameter 'weight' has 1 values for 2 experts"):
        dense.task_arithmetic(B, [B, B], weights=[1.0])
    with pytest.raises(MergeError, match="parameter 'weight' of expert #1 is nan"):
        dense.linear(None, [B, B], weights=[1.0, float("nan")])
    with pytest.raises(MergeError, match="'weight' sums to 0 with normalize"):
        dense.linear(None, [B, B], weights=[1.0, -1.0])
    with pytest.raises(MergeError, match="parameter 'lambda' is inf"):
        dense.ties(B, [B], density=1.0, lambda_=float("inf"))


def test_no_experts_and_non_float() -> None:
    with pytest.raises(MergeError, match="tensor 'w': no expert tensors"):
        dense.task_arithmetic(B, [], name="w")
    with pytest.raises(MergeError, match="expert #0 has non-float dtype torch.int64"):
        dense.task_arithmetic(B, [torch.zeros(2, 3, dtype=torch.long)])


def test_state_dict_key_mismatch_names_expert_and_tensor() -> None:
    base = {"a": B, "b": B}
    with pytest.raises(MergeError, match=r"expert 'code' \(#1\) lacks tensor 'b'"):
        merge_state_dicts("linear", base, [base, {"a": B}], expert_names=["law", "code"])
    with pytest.raises(MergeError, match="expert #0 has tensor 'c' that the base lacks"):
        merge_state_dicts("linear", base, [{**base, "c": B}])


def test_unknown_method_unknown_parameter_missing_base() -> None:
    with pytest.raises(MergeError, match="unknown merge method 'slerp'"):
        merge_state_dicts("slerp", {"w": B}, [{"w": B}])
    with pytest.raises(MergeError, match="parameter 'dnsity'"):
        merge_state_dicts("ties", {"w": B}, [{"w": B}], {"density": 0.5, "dnsity": 0.5})
    with pytest.raises(MergeError, match="parameter 'density'.*Field required"):
        merge_state_dicts("dare_ties", {"w": B}, [{"w": B}], {})
    with pytest.raises(MergeError, match="method 'ties' needs a base model"):
        merge_state_dicts("ties", None, [{"w": B}], {"density": 0.5})


def _layer(e: int = 4) -> MoELayer:
    return MoELayer(
        torch.randn(e, 8), torch.randn(e, 6, 8), torch.randn(e, 6, 8), torch.randn(e, 8, 6)
    )


def test_moe_bad_counts_and_shapes() -> None:
    layer = _layer()
    stats = routing_stats_from_logits(torch.randn(20, 4), top_k=2)
    with pytest.raises(MergeError, match=r"layer 3: parameter 'num_experts' is 5; .*\[1, 4\]"):
        m_smoe_layer(layer, stats, 5, where="layer 3")
    with pytest.raises(MergeError, match="parameter 'num_experts' is 0"):
        uniform_merge_layer(layer, 0)
    wrong = RoutingStats(torch.ones(3) / 3, torch.randn(20, 3), torch.ones(3))
    with pytest.raises(MergeError, match="routing statistics are for 3 experts"):
        m_smoe_layer(layer, wrong, 2)
    broken = MoELayer(layer.router, layer.w1, layer.w3[:, :5], layer.w2)
    with pytest.raises(MergeError, match=r"layer 1: w3 has shape \(4, 5, 8\), want \[4, 6, 8\]"):
        broken.validate("layer 1")
    with pytest.raises(MergeError, match="top_k 5 must be in"):
        routing_stats_from_logits(torch.randn(20, 4), top_k=5)


def test_moe_state_dict_errors() -> None:
    sd = {"model.layers.0.block_sparse_moe.gate.weight": torch.randn(2, 8)}
    for j in range(2):
        ex = f"model.layers.0.block_sparse_moe.experts.{j}"
        sd |= {
            f"{ex}.w1.weight": torch.randn(6, 8),
            f"{ex}.w3.weight": torch.randn(6, 8),
            f"{ex}.w2.weight": torch.randn(8, 6),
        }
    bad = dict(sd)
    bad["model.layers.0.block_sparse_moe.experts.1.w2.weight"] = torch.randn(8, 5)
    with pytest.raises(MergeError, match=r"experts.1.w2.weight': expert 1 has shape \(8, 5\)"):
        read_moe_layer(bad, "model.layers.0", "checkpoint")
    missing = dict(sd)
    del missing["model.layers.0.block_sparse_moe.experts.0.w3.weight"]
    with pytest.raises(MergeError, match="lacks tensor 'model.layers.0.*experts.0.w3.weight'"):
        read_moe_layer(missing, "model.layers.0", "checkpoint")
    stats = {0: routing_stats_from_logits(torch.randn(10, 2), top_k=1)}
    with pytest.raises(MergeError, match="'num_experts' is 1, fewer than the 2 experts"):
        m_smoe_state_dict(sd, stats, MSMoEParams(num_experts=1), top_k=2)
    with pytest.raises(MergeError, match="no routing statistics for layer 0"):
        m_smoe_state_dict(sd, {}, MSMoEParams(num_experts=1))
    with pytest.raises(MergeError, match="no Mixtral-style MoE block"):
        m_smoe_state_dict({"w": B}, stats, MSMoEParams(num_experts=1))


def test_low_rank_bad_rank() -> None:
    with pytest.raises(MergeError, match=r"w2 of expert 3: parameter 'rank' is 9; .*\[1, 6\]"):
        low_rank_sparse(torch.randn(8, 6), 9, name="w2 of expert 3")
