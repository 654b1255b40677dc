"""Read a spec file into composer.spec.Spec: YAML, then the schema, then the cross-field rules
the schema cannot express. Every error is a SpecError naming file, line and field, in words a
user can act on (pydantic's own messages are rewritten)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from composer.spec import (
    ALLOWED_INITS,
    ExpertEntry,
    MoeLayersEvery,
    OutputSpec,
    RouterSpec,
    RouterTuneSpec,
    Spec,
    SpecError,
)
from composer.spec_lines import field_name, line_for, record_lines


def _model_at(loc: tuple[Any, ...]) -> type[BaseModel]:
    """The pydantic model that owns the last key of ``loc`` (for 'expected one of' lists)."""
    model: type[BaseModel] = Spec
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        field = model.model_fields.get(str(part))
        ann = field.annotation if field else None
        for cand in (ExpertEntry, RouterTuneSpec, RouterSpec, OutputSpec, MoeLayersEvery):
            if ann is cand or (ann is not None and cand.__name__ in str(ann)):
                model = cand
                break
    return model


def _message(err: dict[str, Any]) -> tuple[tuple[Any, ...], str]:
    # Drop pydantic's union/tag segments so the location is the YAML path.
    loc = tuple(
        p
        for p in err["loc"]
        if not (isinstance(p, str) and (p.startswith(("literal[", "list[", "function-"))))
        and p not in ("MoeLayersEvery", "int", "str")
    )
    kind, ctx, value = err["type"], err.get("ctx", {}), err.get("input")
    if kind == "literal_error":
        expected = ctx.get("expected", "").replace("'", "").replace(" or ", ", ")
        return loc, f"unknown value {value!r}; expected one of {expected}"
    if kind == "extra_forbidden":
        allowed = ", ".join(_model_at(loc).model_fields)
        return loc, f"unknown field; expected one of {allowed}"
    if kind == "missing":
        return loc, "required field missing"
    if kind in ("int_parsing", "int_type", "int_from_float"):
        return loc, f"expected an integer, got {value!r}"
    if kind in ("float_parsing", "float_type"):
        return loc, f"expected a number, got {value!r}"
    if kind in ("bool_parsing", "bool_type"):
        return loc, f"expected true or false, got {value!r}"
    if kind in ("string_type",):
        return loc, f"expected a string, got {value!r}"
    if kind in ("list_type",):
        return loc, f"expected a list, got {value!r}"
    if kind in ("model_type", "model_attributes_type", "dict_type"):
        return loc, f"expected a mapping, got {value!r}"
    if kind in ("greater_than_equal", "greater_than", "less_than_equal", "less_than"):
        op = {"greater_than_equal": ">=", "greater_than": ">"}.get(kind) or (
            "<=" if kind == "less_than_equal" else "<"
        )
        bound = next(iter(ctx.values()))
        return loc, f"must be {op} {bound}, got {value!r}"
    if kind in ("string_too_short", "too_short"):
        return loc, "must not be empty"
    if kind == "string_pattern_mismatch":
        return loc, f"{value!r} is not a valid name (letters, digits, '_', '.', '-')"
    msg = err["msg"]
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, ") :]
    return loc, msg


def _check_semantics(spec: Spec) -> tuple[tuple[Any, ...], str] | None:
    """Cross-field rules the schema cannot express; returns (loc, message) of the first problem."""
    m = spec.method
    if m == "compose" and spec.style is None:
        return ("method",), "method 'compose' needs a style: flexolmo or btx"
    if m != "compose" and spec.style is not None:
        return ("style",), f"only method 'compose' takes a style, not method {m!r}"
    if m != "compose" and spec.lora is not None:
        return ("lora",), f"only method 'compose' takes lora, not method {m!r}"
    if m != "merge" and spec.output.format != "checkpoint":
        return ("output", "format"), f"only method 'merge' writes a LoRA adapter, not {m!r}"
    if m == "upcycle":
        if spec.num_experts is None:
            return ("method",), "method 'upcycle' needs num_experts"
        if spec.experts:
            return ("experts",), "method 'upcycle' copies the base FFN; use num_experts"
        if spec.expert_names is not None and len(spec.expert_names) != spec.num_experts:
            return ("expert_names",), (
                f"expected {spec.num_experts} names (num_experts), got {len(spec.expert_names)}"
            )
    if m == "compose":
        if not spec.experts:
            return ("experts",), "method 'compose' needs at least one expert"
        if spec.num_experts is not None:
            return ("num_experts",), "the experts list fixes the expert count for 'compose'"
        if spec.style == "btx" and len(spec.experts) < 2:
            return ("experts",), "compose/btx needs at least two experts"
    if spec.router.tune is not None and m not in ("upcycle", "compose"):
        return ("router", "tune"), (
            f"router tuning applies to methods upcycle and compose, not {m!r}"
        )
    if m in ("upcycle", "compose"):
        names = [e.name or Path(e.ref).name for e in spec.experts]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            return ("experts",), f"duplicate expert names: {', '.join(dup)}"
        n = spec.n_experts
        if spec.top_k > n:
            return ("top_k",), f"must be <= the number of experts ({n}), got {spec.top_k}"
        key = spec.style if m == "compose" else m
        init = spec.router.init
        if init is not None and init not in ALLOWED_INITS[key]:
            what = f"compose/{key}" if m == "compose" else m
            return ("router", "init"), (
                f"{init!r} is not available for {what}; expected one of "
                + ", ".join(ALLOWED_INITS[key])
            )
        if init == "hidden_mean":
            cal = spec.router.calibration
            if not cal or len(cal) != n:
                got = len(cal) if cal else 0
                return ("router", "calibration"), (
                    f"hidden_mean needs one calibration entry per expert ({n}), got {got}"
                )
        if init == "given" and not spec.router.weights:
            return ("router", "weights"), "router init 'given' needs router.weights"
        if spec.router.gating_logit_norm is not None and not spec.router.calibration:
            return ("router", "gating_logit_norm"), (
                "gating-logit normalisation is calibrated on router.calibration texts"
            )
    return None


def _error_from_loc(
    path: Path | None, lines: dict[tuple[Any, ...], int], loc: tuple[Any, ...], msg: str
) -> SpecError:
    return SpecError(path, line_for(loc, lines), field_name(loc), msg)


def parse_spec(text: str, path: str | Path | None = None) -> Spec:
    """Validate spec text; raises SpecError naming ``path``, the line and the field."""
    p = Path(path) if path is not None else None
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        line = mark.line + 1 if mark is not None else None
        raise SpecError(p, line, "", f"invalid YAML: {e.problem}") from None
    if not isinstance(data, dict):
        raise SpecError(p, 1, "", "expected a mapping of fields (method, base, ...)")
    lines: dict[tuple[Any, ...], int] = {}
    if node is not None:
        record_lines(node, (), lines)
    try:
        spec = Spec.model_validate(data)
    except ValidationError as e:
        errs = e.errors()
        # Union fields report one error per branch; the deepest is the branch the user meant.
        same = [x for x in errs if x["loc"][:1] == errs[0]["loc"][:1]]
        loc, msg = _message(
            max(same, key=lambda x: (len(x["loc"]), x["type"] == "extra_forbidden"))
        )
        raise _error_from_loc(p, lines, loc, msg) from None
    problem = _check_semantics(spec)
    if problem is not None:
        raise _error_from_loc(p, lines, problem[0], problem[1])
    spec._source = p.resolve() if p is not None else None
    spec._lines = lines
    return spec


def load_spec(path: str | Path) -> Spec:
    """Read and validate a spec file (raises SpecError)."""
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as e:
        raise SpecError(p, None, "", f"cannot read spec: {e.strerror}") from None
    return parse_spec(text, p)
