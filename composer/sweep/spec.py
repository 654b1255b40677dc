"""SWEEP.yaml: which base spec, which overrides, what data scores the candidates, how the best is
chosen. Read into pydantic models (extra="forbid"); every error names the sweep file, line and
field. Candidates are the base spec's YAML mapping with dotted-path overrides applied
(``parameters.density``, ``router.tune.steps``, ``experts.1.weight``); a path that names no field
of the spec is an error before anything runs. Values are checked when the candidate is planned:
an invalid combination fails that candidate only.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from composer.spec import Spec
from composer.spec_lines import field_name, line_for, record_lines
from registry.errors import ComposerError


class SweepError(ComposerError):
    """A sweep file that cannot be run; str() is ``file:line: field: problem``."""


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class EvalSpec(_Model):
    data: dict[str, str | list[str]] = Field(min_length=1)  # domain -> file, folder or glob
    seq_len: int = Field(128, ge=2)
    max_chunks: int = Field(16, ge=1)


class SelectSpec(_Model):
    metric: str = "mean_perplexity"  # or perplexity.<domain>
    mode: Literal["min", "max"] = "min"


class SweepSpec(_Model):
    base: str | dict[str, Any]  # a spec file (relative to the sweep file) or the spec inline
    grid: dict[str, list[Any]] | None = None  # dotted field path -> values (every combination)
    candidates: list[dict[str, Any]] | None = None  # or: a list of override mappings
    eval: EvalSpec
    select: SelectSpec = Field(default_factory=SelectSpec)


@dataclass(frozen=True)
class Candidate:
    label: str
    overrides: dict[str, Any]  # dotted path -> value
    lines: dict[str, int]  # dotted path -> line of the sweep file that set it
    spec_text: str  # the candidate spec as YAML


@dataclass(frozen=True)
class Sweep:
    spec: SweepSpec
    path: Path
    base_path: Path  # relative paths of every candidate resolve against its folder
    base_data: dict[str, Any]
    candidates: list[Candidate]


def _error(path: Path, line: int | None, field: str, message: str) -> SweepError:
    where = f"{path}:{line}" if line else str(path)
    return SweepError(f"{where}: {field}: {message}" if field else f"{where}: {message}")


def load_sweep(path: str | Path) -> Sweep:
    """Read and check SWEEP.yaml: schema, base spec, data, every override's field path."""
    p = Path(path)
    try:
        text = p.read_text()
        node, data = yaml.compose(text, Loader=yaml.SafeLoader), yaml.safe_load(text)
    except OSError as e:
        raise _error(p, None, "", f"cannot read sweep file: {e.strerror}") from None
    except yaml.MarkedYAMLError as e:
        line = e.problem_mark.line + 1 if e.problem_mark else None
        raise _error(p, line, "", f"invalid YAML: {e.problem}") from None
    lines: dict[tuple[Any, ...], int] = {}
    if node is not None:
        record_lines(node, (), lines)
    if not isinstance(data, dict):
        raise _error(p, 1, "", "expected a mapping (base, grid or candidates, eval, select)")
    try:
        spec = SweepSpec.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        loc = tuple(x for x in err["loc"] if not str(x).startswith(("str", "list[", "dict[")))
        msg = "unknown field" if err["type"] == "extra_forbidden" else err["msg"]
        raise _error(p, line_for(loc, lines), field_name(loc), msg) from None
    if (spec.grid is None) == (spec.candidates is None):
        raise _error(p, 1, "grid", "give either grid (every combination) or candidates (a list)")
    if isinstance(spec.base, str):
        base_path = (p.parent / spec.base).resolve()
        try:
            base_data = yaml.safe_load(base_path.read_text())
        except OSError as e:
            raise _error(p, lines.get(("base",)), "base", f"{base_path}: {e.strerror}") from None
        if not isinstance(base_data, dict):
            raise _error(p, lines.get(("base",)), "base", f"{base_path}: not a spec mapping")
    else:
        base_path, base_data = p.resolve(), dict(spec.base)
    cands = _expand(p, spec, lines, base_data)
    return Sweep(spec, p, base_path, base_data, cands)


def _expand(
    p: Path, spec: SweepSpec, lines: dict[tuple[Any, ...], int], base: dict[str, Any]
) -> list[Candidate]:
    if spec.grid is not None:
        keys = list(spec.grid)
        where = {k: lines.get(("grid", k), 1) for k in keys}
        for k in keys:
            if not spec.grid[k]:
                raise _error(p, where[k], f"grid.{k}", "needs at least one value")
        values = itertools.product(*spec.grid.values())
        combos = [dict(zip(keys, vals, strict=True)) for vals in values]
        line_of = [where] * len(combos)
        prefix = "grid"
    else:
        assert spec.candidates is not None
        combos = spec.candidates
        line_of = [
            {k: lines.get(("candidates", i, k), lines.get(("candidates", i), 1)) for k in c}
            for i, c in enumerate(combos)
        ]
        prefix = "candidates"
    out = []
    for i, (overrides, where) in enumerate(zip(combos, line_of, strict=True)):
        for k in overrides:
            problem = check_path(k)
            if problem:
                field = f"{prefix}.{k}" if prefix == "grid" else f"candidates[{i}].{k}"
                raise _error(p, where[k], field, problem)
        try:
            data = apply_overrides(base, overrides)
        except SweepError as e:
            raise _error(p, min(where.values(), default=1), prefix, str(e)) from None
        text = yaml.safe_dump(data, sort_keys=False)
        out.append(Candidate(f"c{i}", dict(overrides), dict(where), text))
    return out


def _models_in(annotation: Any) -> list[Any]:
    """The pydantic models (and list[...] of them) a field annotation admits."""
    out: list[Any] = []
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    for arg in get_args(annotation):
        out += _models_in(arg)
    return out


def check_path(path: str) -> str | None:
    """Why a dotted path names no field of a spec (None when it does). Under ``parameters`` any
    key goes: the method's own parameter model checks them when the candidate is planned."""
    model: Any = Spec
    parts = path.split(".")
    for i, part in enumerate(parts):
        if part.isdigit():
            if i == 0 or parts[i - 1] not in ("experts", "expert_names", "moe_layers"):
                return f"{part!r}: a list index where no list is"
            continue
        if model is None:
            return f"{part!r}: {parts[i - 1]!r} holds a value, not fields"
        fields = model.model_fields
        if part not in fields:
            return f"unknown field {part!r}; expected one of {', '.join(fields)}"
        if part == "parameters":
            return None
        models = _models_in(fields[part].annotation)
        model = models[0] if models else None
    return None


def apply_overrides(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """A deep copy of ``base`` with each dotted path set (missing mappings are created)."""
    data: dict[str, Any] = yaml.safe_load(yaml.safe_dump(base))
    for path, value in overrides.items():
        node: Any = data
        parts = path.split(".")
        for j, part in enumerate(parts[:-1]):
            key: Any = int(part) if part.isdigit() else part
            nxt = parts[j + 1]
            if isinstance(node, list):
                if key >= len(node):
                    raise SweepError(f"{path}: index {key} is past the end of the list")
                if isinstance(node[key], str) and not nxt.isdigit():
                    node[key] = {"ref": node[key]}  # the short form of an expert entry
                node = node[key]
                continue
            if node.get(key) is None:
                node[key] = [] if nxt.isdigit() else {}
            node = node[key]
        last: Any = int(parts[-1]) if parts[-1].isdigit() else parts[-1]
        node[last] = value
    return data
