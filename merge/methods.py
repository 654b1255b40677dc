"""The merge methods, in one table: spec name -> kind, parameter model, function.

Adding a method is adding its module (pure tensor functions plus a pydantic parameter model
with ``extra="forbid"``) and one row here; composer.merging validates a spec's ``parameters:``
with the row's model and calls the row's function.

Kinds and the signature of ``fn``:
- ``dense``: ``fn(src: rows.TensorRows, **params.model_dump()) -> rows.Rows``, merged rows
  of one tensor asked for in order (merge.state_dict runs it on whole tensors, composer's
  builds on rows read from disk). The parameter models' field names are the keywords.
- ``calibrated``: ``fn(model, base_sd, expert_sds, calibration, params, expert_names,
  compute_dtype) -> ExpertMergingResult`` (merge.expert_merging).
- ``moe``: ``fn(state_dict, stats, params, top_k)`` (m_smoe) or ``fn(state_dict, params,
  top_k)`` (uniform) -> (new state dict, groups per layer); ``layer_fn(params, stats)`` gives
  the same merge one MoE block at a time (merge.m_smoe.merge_layer), which builds stream.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel

from merge import rows
from merge.errors import MergeError
from merge.expert_merging import (
    ExpertMergingParams,
    ExpertMergingPlusParams,
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

Kind = Literal["dense", "calibrated", "moe"]


@dataclass(frozen=True)
class MergeMethod:
    name: str
    kind: Kind
    params: type[BaseModel]
    fn: Callable[..., Any]
    layer_fn: Callable[[Any, Any], LayerFn] | None = None  # moe only

    def rows(self, src: rows.TensorRows, params: BaseModel) -> rows.Rows:
        """A dense method on one tensor: the merged rows function."""
        return self.fn(src, **params.model_dump())


METHODS: dict[str, MergeMethod] = {
    m.name: m
    for m in (
        MergeMethod("linear", "dense", LinearParams, rows.linear_rows),
        MergeMethod("task_arithmetic", "dense", TaskArithmeticParams, rows.task_arithmetic_rows),
        MergeMethod("ties", "dense", TiesParams, rows.ties_rows),
        MergeMethod("dare_linear", "dense", DareLinearParams, rows.dare_rows),
        MergeMethod("dare_ties", "dense", DareTiesParams, rows.dare_ties_rows),
        MergeMethod("expert_merging", "calibrated", ExpertMergingParams, expert_merging),
        MergeMethod("expert_merging++", "calibrated", ExpertMergingPlusParams, expert_merging_plus),
        MergeMethod("m_smoe", "moe", MSMoEParams, m_smoe_state_dict, m_smoe_layer_fn),
        MergeMethod(
            "uniform",
            "moe",
            UniformMergeParams,
            uniform_merge_state_dict,
            lambda params, _stats: uniform_layer_fn(params),
        ),
    )
}


def names(*kinds: Kind) -> tuple[str, ...]:
    """The method names of the given kinds, in table order."""
    return tuple(n for n, m in METHODS.items() if m.kind in kinds)


def method(name: str, *kinds: Kind) -> MergeMethod:
    """The table row of ``name``, which must be of one of ``kinds``; MergeError names the known
    ones otherwise."""
    m = METHODS.get(name)
    if m is None or m.kind not in kinds:
        raise MergeError(f"unknown merge method {name!r}; known: {sorted(names(*kinds))}")
    return m
