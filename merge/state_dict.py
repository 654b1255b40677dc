"""Apply a dense merge method to one tensor (whole, or in row blocks) or whole state dicts."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from pydantic import BaseModel, ValidationError
from torch import Tensor

from merge.errors import MergeError
from merge.methods import method as merge_method
from merge.rows import Rows, TensorRows
from merge.task_vectors import check_tensors


def parse_params(method: str, params: Mapping[str, Any] | BaseModel | None) -> BaseModel:
    """Validate ``params`` for ``method``; errors name the method and the parameter."""
    model_cls = merge_method(method, "dense").params
    if isinstance(params, model_cls):
        return params
    if isinstance(params, BaseModel):
        params = params.model_dump(by_alias=True)
    try:
        return model_cls.model_validate(dict(params or {}))
    except ValidationError as exc:
        problems = "; ".join(
            f"parameter {'.'.join(str(p) for p in e['loc'])!r}: {e['msg']}" for e in exc.errors()
        )
        raise MergeError(f"method {method!r}: {problems}") from exc


def check_keys(
    base: Mapping[str, Tensor] | None,
    experts: Sequence[Mapping[str, Tensor]],
    expert_names: Sequence[str] | None = None,
) -> list[str]:
    """The tensor names to merge; MergeError naming the expert and tensor when key sets differ."""
    if not experts:
        raise MergeError("no experts to merge")
    ref = set(base) if base is not None else set(experts[0])
    ref_what = "the base" if base is not None else "expert #0"
    for i, sd in enumerate(experts):
        who = f"expert {expert_names[i]!r} (#{i})" if expert_names else f"expert #{i}"
        missing, extra = sorted(ref - set(sd)), sorted(set(sd) - ref)
        if missing:
            raise MergeError(f"{who} lacks tensor {missing[0]!r} that {ref_what} has")
        if extra:
            raise MergeError(f"{who} has tensor {extra[0]!r} that {ref_what} lacks")
    return sorted(ref)


def merge_tensor(
    method: str,
    name: str,
    base: Tensor | None,
    experts: Sequence[Tensor],
    params: Mapping[str, Any] | BaseModel | None,
    expert_names: Sequence[str] | None = None,
) -> Tensor:
    """Merge one tensor with ``method``; non-float tensors are copied from the base."""
    p = parse_params(method, params)
    ref = base if base is not None else experts[0]
    if not ref.is_floating_point():
        return ref.clone()
    check_tensors(base, experts, name=name, expert_names=expert_names)
    src = TensorRows.of(base, experts, name=name, expert_names=expert_names)
    return src.whole(merge_rows(method, src, p))


def merge_rows(method: str, src: TensorRows, params: Mapping[str, Any] | BaseModel | None) -> Rows:
    """Prepare ``method`` for one tensor of float inputs: returns f(a, b), the merged rows
    [a, b) in ``src.dtype``; ask for the rows in order, once each (DARE draws as it goes)."""
    p = parse_params(method, params)
    if src.base is None and method != "linear":
        raise MergeError(f"method {method!r} needs a base model")
    return merge_method(method, "dense").rows(src, p)


def merge_state_dicts(
    method: str,
    base: Mapping[str, Tensor] | None,
    experts: Sequence[Mapping[str, Tensor]],
    params: Mapping[str, Any] | BaseModel | None = None,
    expert_names: Sequence[str] | None = None,
) -> dict[str, Tensor]:
    """Merge whole state dicts tensor by tensor. ``base`` may be None only for ``linear``."""
    p = parse_params(method, params)
    if base is None and method != "linear":
        raise MergeError(f"method {method!r} needs a base model")
    names = check_keys(base, experts, expert_names)
    return {
        n: merge_tensor(
            method,
            n,
            base[n] if base is not None else None,
            [e[n] for e in experts],
            p,
            expert_names,
        )
        for n in names
    }
