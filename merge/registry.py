"""Method tables: spec method name -> (pydantic parameter model, function).

Dense entries have the signature ``fn(base, experts, params, *, name, expert_names) -> Tensor``
over one tensor (see merge.state_dict for whole state dicts).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from pydantic import BaseModel
from torch import Tensor

from merge import dense
from merge.expert_merging import (
    ExpertMergingParams,
    ExpertMergingPlusParams,
    ExpertMergingResult,
    expert_merging,
    expert_merging_plus,
)
from merge.m_smoe import (
    MSMoEParams,
    UniformMergeParams,
    m_smoe_state_dict,
    uniform_merge_state_dict,
)
from merge.params import (
    DareLinearParams,
    DareTiesParams,
    LinearParams,
    TaskArithmeticParams,
    TiesParams,
)

DenseFn = Callable[..., Tensor]


def _linear(
    base: Tensor | None,
    experts: Sequence[Tensor],
    p: LinearParams,
    *,
    name: str,
    expert_names: Sequence[str] | None = None,
) -> Tensor:
    return dense.linear(
        base,
        experts,
        weights=p.weight,
        normalize=p.normalize,
        name=name,
        expert_names=expert_names,
    )


def _task_arithmetic(
    base: Tensor,
    experts: Sequence[Tensor],
    p: TaskArithmeticParams,
    *,
    name: str,
    expert_names: Sequence[str] | None = None,
) -> Tensor:
    return dense.task_arithmetic(
        base,
        experts,
        weights=p.weight,
        lambda_=p.lambda_,
        normalize=p.normalize,
        name=name,
        expert_names=expert_names,
    )


def _ties(
    base: Tensor,
    experts: Sequence[Tensor],
    p: TiesParams,
    *,
    name: str,
    expert_names: Sequence[str] | None = None,
) -> Tensor:
    return dense.ties(
        base,
        experts,
        density=p.density,
        weights=p.weight,
        lambda_=p.lambda_,
        normalize=p.normalize,
        name=name,
        expert_names=expert_names,
    )


def _dare_linear(
    base: Tensor,
    experts: Sequence[Tensor],
    p: DareLinearParams,
    *,
    name: str,
    expert_names: Sequence[str] | None = None,
) -> Tensor:
    return dense.dare_linear(
        base,
        experts,
        density=p.density,
        weights=p.weight,
        lambda_=p.lambda_,
        normalize=p.normalize,
        seed=p.seed,
        name=name,
        expert_names=expert_names,
    )


def _dare_ties(
    base: Tensor,
    experts: Sequence[Tensor],
    p: DareTiesParams,
    *,
    name: str,
    expert_names: Sequence[str] | None = None,
) -> Tensor:
    return dense.dare_ties(
        base,
        experts,
        density=p.density,
        weights=p.weight,
        lambda_=p.lambda_,
        normalize=p.normalize,
        seed=p.seed,
        name=name,
        expert_names=expert_names,
    )


DENSE_METHODS: dict[str, tuple[type[BaseModel], DenseFn]] = {
    "linear": (LinearParams, _linear),
    "task_arithmetic": (TaskArithmeticParams, _task_arithmetic),
    "ties": (TiesParams, _ties),
    "dare_linear": (DareLinearParams, _dare_linear),
    "dare_ties": (DareTiesParams, _dare_ties),
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
