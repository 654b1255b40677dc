"""Method tables: spec method name -> (pydantic parameter model, function).

Dense entries have the signature ``fn(src: dense.TensorRows, params) -> dense.Rows``: they
merge one tensor in blocks of rows (merge.state_dict.merge_tensor runs them on whole tensors,
composer's builds on rows read from disk).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from pydantic import BaseModel

from merge import dense
from merge.expert_merging import (
    ExpertMergingParams,
    ExpertMergingPlusParams,
    ExpertMergingResult,
    expert_merging,
    expert_merging_plus,
)
from merge.m_smoe import (
    LayerFn,
    MSMoEParams,
    UniformMergeParams,
    m_smoe_layer_fn,
    m_smoe_state_dict,
    uniform_layer_fn,
    uniform_merge_state_dict,
)
from merge.params import (
    DareLinearParams,
    DareTiesParams,
    LinearParams,
    TaskArithmeticParams,
    TiesParams,
)

RowsFn = Callable[[dense.TensorRows, BaseModel], dense.Rows]


def _linear(src: dense.TensorRows, p: LinearParams) -> dense.Rows:
    return dense.linear_rows(src, weights=p.weight, normalize=p.normalize)


def _task_arithmetic(src: dense.TensorRows, p: TaskArithmeticParams) -> dense.Rows:
    return dense.task_arithmetic_rows(
        src, weights=p.weight, lambda_=p.lambda_, normalize=p.normalize
    )


def _ties(src: dense.TensorRows, p: TiesParams) -> dense.Rows:
    return dense.ties_rows(
        src, density=p.density, weights=p.weight, lambda_=p.lambda_, normalize=p.normalize
    )


def _dare_linear(src: dense.TensorRows, p: DareLinearParams) -> dense.Rows:
    return dense.dare_rows(
        src,
        density=p.density,
        weights=p.weight,
        lambda_=p.lambda_,
        normalize=p.normalize,
        seed=p.seed,
    )


def _dare_ties(src: dense.TensorRows, p: DareTiesParams) -> dense.Rows:
    return dense.dare_rows(
        src,
        density=p.density,
        weights=p.weight,
        lambda_=p.lambda_,
        normalize=p.normalize,
        seed=p.seed,
        ties=True,
    )


# fn(src, params) -> rows function: merged rows [a, b) of one tensor, asked for in order.
DENSE_METHODS: dict[str, tuple[type[BaseModel], RowsFn]] = {
    "linear": (LinearParams, _linear),  # type: ignore[dict-item]
    "task_arithmetic": (TaskArithmeticParams, _task_arithmetic),  # type: ignore[dict-item]
    "ties": (TiesParams, _ties),  # type: ignore[dict-item]
    "dare_linear": (DareLinearParams, _dare_linear),  # type: ignore[dict-item]
    "dare_ties": (DareTiesParams, _dare_ties),  # type: ignore[dict-item]
}


# Calibration-driven dense merges: fn(model, base_sd, expert_sds, calibration, params,
# expert_names) -> ExpertMergingResult (see merge.expert_merging).
CALIBRATED_METHODS: dict[str, tuple[type[BaseModel], Callable[..., ExpertMergingResult]]] = {
    "expert_merging": (ExpertMergingParams, expert_merging),
    "expert_merging++": (ExpertMergingPlusParams, expert_merging_plus),
}

# MoE merges over a Mixtral state dict: m_smoe: fn(sd, stats, params, top_k); uniform:
# fn(sd, params, top_k); both -> (new_sd, groups per layer). See merge.m_smoe.
MOE_METHODS: dict[str, tuple[type[BaseModel], Callable[..., tuple[dict, dict]]]] = {
    "m_smoe": (MSMoEParams, m_smoe_state_dict),
    "uniform": (UniformMergeParams, uniform_merge_state_dict),
}

# The same, one MoE block at a time (builds stream the blocks): fn(params, stats) -> LayerFn for
# merge.m_smoe.merge_layer; stats is None for uniform.
MOE_LAYER_METHODS: dict[str, Callable[[BaseModel, Any], LayerFn]] = {
    "m_smoe": m_smoe_layer_fn,  # type: ignore[dict-item]
    "uniform": lambda params, _stats: uniform_layer_fn(params),  # type: ignore[arg-type]
}
