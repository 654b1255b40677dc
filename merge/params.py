"""Pydantic parameter models for the dense merge methods (the ``parameters:`` of a spec).

Names follow mergekit: ``weight`` is one value per expert (a list here, in the experts' order),
``density`` one value or one per expert, ``lambda`` the task-vector scale, ``normalize``.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, field_validator

Weights = list[float] | None
Densities = float | list[float]


def _check_density(value: Densities) -> Densities:
    values = [value] if isinstance(value, int | float) else value
    for i, d in enumerate(values):
        if not (0.0 < d <= 1.0):
            raise ValueError(f"density {d} (entry {i}) must be in (0, 1]")
    return value


class _Params(BaseModel):
    # Specs spell the parameters as the aliases (mergekit's names); the field names are the
    # keywords of the merge functions, which merge.methods calls with ``model_dump()``.
    model_config = ConfigDict(extra="forbid", validate_by_alias=True, validate_by_name=False)


class LinearParams(_Params):
    weights: Weights = Field(None, alias="weight")
    normalize: bool = True


class TaskArithmeticParams(_Params):
    weights: Weights = Field(None, alias="weight")
    lambda_: float = Field(1.0, alias="lambda")
    normalize: bool = False


class TiesParams(_Params):
    density: Densities
    weights: Weights = Field(None, alias="weight")
    lambda_: float = Field(1.0, alias="lambda")
    normalize: bool = True

    _density = field_validator("density")(_check_density)


class DareLinearParams(_Params):
    density: Densities
    weights: Weights = Field(None, alias="weight")
    lambda_: float = Field(1.0, alias="lambda")
    normalize: bool = False
    seed: int = 0

    _density = field_validator("density")(_check_density)


class DareTiesParams(DareLinearParams):
    normalize: bool = True
