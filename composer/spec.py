"""The YAML build spec: pydantic v2 models and a loader whose errors name file, line and field.

Example (docs/spec.md has the full field reference)::

    method: compose
    style: flexolmo
    base: smollm2
    experts: [code, legal, manuals]
    top_k: 2
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator

from composer.precision import Bf16Setting
from registry.errors import ComposerError

METHODS = ("upcycle", "compose", "merge", "moe_merge")
STYLES = ("flexolmo", "btx")
ROUTER_INITS = ("random", "hidden_mean", "given", "domain_embedding", "trained")
DTYPES = ("auto", "float32", "bfloat16", "float16")

# Router initialisations each method accepts (checked after the schema).
ALLOWED_INITS: dict[str, tuple[str, ...]] = {
    "upcycle": ("random", "hidden_mean", "given"),
    "flexolmo": ("domain_embedding", "trained", "random", "given"),
    "btx": ("random", "given"),
}


class SpecError(ComposerError):
    """A spec that cannot be read or is invalid; str() is ``file:line: field: message``."""

    def __init__(self, path: str | Path | None, line: int | None, field: str, message: str):
        self.path = str(path) if path is not None else "<spec>"
        self.line = line
        self.field = field
        self.message = message
        where = f"{self.path}:{line}" if line is not None else self.path
        what = f"{field}: {message}" if field else message
        super().__init__(f"{where}: {what}")


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ExpertEntry(_Model):
    """One expert input. A bare string in YAML is shorthand for ``{ref: ...}``."""

    ref: str = Field(min_length=1)
    name: str | None = Field(default=None, pattern=r"^[A-Za-z0-9_.-]+$")
    weight: float = Field(default=1.0, gt=0)  # btx: weight of this expert in the average


class MoeLayersEvery(_Model):
    every: int = Field(ge=1)
    offset: int = Field(default=0, ge=0)


class RouterTuneSpec(_Model):
    """Router tuning on proxy text the experts' owners contributed (FlexOlmo's optional step).

    Only the router rows (and the FlexOlmo router bias, when the build keeps one) of the MoE
    layers train, with the language-model loss on the proxy text; every other weight is frozen.
    """

    # expert name (as in config.json's composer_experts) -> text files, folders or globs
    proxy: dict[str, list[str]] = Field(min_length=1)
    steps: int = Field(default=40, ge=1)
    lr: float = Field(default=1e-2, gt=0)
    batch_size: int = Field(default=8, ge=1)
    seq_len: int = Field(default=128, ge=2)
    max_chunks: int = Field(default=32, ge=1)  # per expert, of seq_len tokens
    # per expert: the sequences the recorded before/after loss is measured on
    loss_sequences: int = Field(default=32, ge=1)
    bf16: Bf16Setting = "auto"  # bf16 autocast; auto: where native (composer.precision)
    tokenizer: Literal["base", "bytes"] = "base"  # bytes: UTF-8 bytes (tiny test models)

    @field_validator("proxy", mode="before")
    @classmethod
    def _wrap_single_paths(cls, v: Any) -> Any:
        # Allow `code: proxy/code` for one file, folder or glob.
        if isinstance(v, dict):
            return {k: [x] if isinstance(x, str) else x for k, x in v.items()}
        return v

    @field_validator("proxy")
    @classmethod
    def _non_empty_lists(cls, v: dict[str, list[str]]) -> dict[str, list[str]]:
        for name, paths in v.items():
            if not paths:
                raise ValueError(f"expert {name!r} names no proxy file")
        return v


class RouterSpec(_Model):
    init: Literal["random", "hidden_mean", "given", "domain_embedding", "trained"] | None = None
    # hidden_mean: one list of text files per expert (in expert order); paths relative to the spec.
    calibration: list[list[str]] | None = None
    # flexolmo: text files whose mean hidden state becomes the public expert's router row.
    public_calibration: list[str] | None = None
    weights: str | None = None  # given: safetensors with model.layers.{i}.router [E, hidden]
    gating_logit_norm: float | None = Field(default=None, gt=0)  # Skywork-MoE lambda
    expert_bias: bool = True  # keep FlexOlmo's per-expert router bias when experts carry one
    max_calibration_tokens: int = Field(default=4096, ge=1)
    tune: RouterTuneSpec | None = None  # router tuning on the owners' proxy text (after the write)

    @field_validator("calibration", mode="before")
    @classmethod
    def _wrap_single_files(cls, v: Any) -> Any:
        # Allow `calibration: [a.txt, b.txt]` as one file per expert.
        if isinstance(v, list):
            return [[x] if isinstance(x, str) else x for x in v]
        return v


class OutputSpec(_Model):
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    max_shard_size: int | str = "2GB"

    @field_validator("max_shard_size")
    @classmethod
    def _size(cls, v: int | str) -> int | str:
        parse_size(v)
        return v


class Spec(_Model):
    name: str | None = Field(default=None, pattern=r"^[A-Za-z0-9_.-]+$")
    description: str | None = None
    method: Literal["upcycle", "compose", "merge", "moe_merge"]
    style: Literal["flexolmo", "btx"] | None = None
    base: str = Field(min_length=1)
    experts: list[ExpertEntry] = Field(default_factory=list)
    num_experts: int | None = Field(default=None, ge=1, le=256)
    expert_names: list[str] | None = None
    top_k: int = Field(default=2, ge=1)
    moe_layers: Literal["all"] | list[int] | MoeLayersEvery = "all"
    norm_topk_prob: bool | None = None
    router: RouterSpec = Field(default_factory=RouterSpec)
    output: OutputSpec = Field(default_factory=OutputSpec)
    seed: int = Field(default=0, ge=0)
    parameters: dict[str, Any] | None = None  # method parameters of merge / moe_merge (later)

    _source: Path | None = PrivateAttr(default=None)
    _lines: dict[tuple[Any, ...], int] = PrivateAttr(default_factory=dict)

    @field_validator("experts", mode="before")
    @classmethod
    def _expand_short_experts(cls, v: Any) -> Any:
        if isinstance(v, list):
            return [{"ref": x} if isinstance(x, str) else x for x in v]
        return v

    @field_validator("moe_layers", mode="before")
    @classmethod
    def _moe_layers(cls, v: Any) -> Any:
        ok = v == "all" or isinstance(v, dict)
        ok = ok or (isinstance(v, list) and all(isinstance(x, int) and x >= 0 for x in v))
        if not ok or isinstance(v, bool):
            raise ValueError(
                f"expected 'all', a list of layer indices or {{every: N, offset: M}}, got {v!r}"
            )
        return v

    @property
    def source(self) -> Path | None:
        """The file the spec was read from (relative paths in it are resolved against it)."""
        return self._source

    def where(self, *loc: Any) -> str:
        """``file:line: field`` of a spec location, for errors found after parsing."""
        where = str(self._source) if self._source is not None else "<spec>"
        line = self.line(*loc)
        if line is not None:
            where += f":{line}"
        return f"{where}: {_field_name(tuple(loc))}"

    def line(self, *loc: Any) -> int | None:
        """The line of a spec location (its deepest key that the YAML has), None if unknown."""
        return _line_for(tuple(loc), self._lines) if self._lines else None

    def resolve_path(self, p: str) -> Path:
        """A path of the spec: ``$VARS`` and ``~`` expanded, relative to the spec's folder."""
        expanded = os.path.expandvars(p)
        unset = re.search(r"\$\{?(\w+)", expanded)
        if unset:
            raise SpecError(
                self._source, None, "", f"{p!r}: environment variable {unset.group(1)} is not set"
            )
        path = Path(expanded).expanduser()
        if not path.is_absolute() and self._source is not None:
            path = self._source.parent / path
        return path

    @property
    def n_experts(self) -> int:
        """Experts in the output model (compose/flexolmo counts the public model as expert 0)."""
        if self.method == "upcycle":
            return self.num_experts or 0
        if self.style == "flexolmo":
            return len(self.experts) + 1
        return len(self.experts)

    def canonical_json(self) -> str:
        return json.dumps(self.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))

    def sha256(self) -> str:
        return hashlib.sha256(self.canonical_json().encode()).hexdigest()


def parse_size(v: int | str) -> int:
    """'2GB' / '500MB' / 1000000 -> bytes (decimal units, as transformers uses)."""
    if isinstance(v, int):
        if v <= 0:
            raise ValueError("expected a positive size")
        return v
    s = v.strip().upper()
    units = (("GIB", 2**30), ("MIB", 2**20), ("KIB", 2**10))
    units += (("GB", 10**9), ("MB", 10**6), ("KB", 10**3), ("B", 1))
    for unit, mult in units:
        if s.endswith(unit):
            try:
                n = int(float(s[: -len(unit)]) * mult)
            except (ValueError, OverflowError):  # 'xMB', 'nanMB', 'infGB'
                break
            if n <= 0:  # '-5MB' or '0GB' would give one shard per tensor
                raise ValueError(f"expected a positive size, got {v!r}")
            return n
    raise ValueError(f"expected a size like '2GB' or '500MB', got {v!r}")


# --------------------------------------------------------------------------- YAML with lines


def _record_lines(
    node: yaml.Node, path: tuple[Any, ...], lines: dict[tuple[Any, ...], int]
) -> None:
    if isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            k = key.value
            lines[path + (k,)] = key.start_mark.line + 1
            _record_lines(value, path + (k,), lines)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            lines[path + (i,)] = item.start_mark.line + 1
            _record_lines(item, path + (i,), lines)


def _line_for(loc: tuple[Any, ...], lines: dict[tuple[Any, ...], int]) -> int:
    for n in range(len(loc), 0, -1):
        if loc[:n] in lines:
            return lines[loc[:n]]
    return 1


def _field_name(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out


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
    return SpecError(path, _line_for(loc, lines), _field_name(loc), msg)


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
        _record_lines(node, (), lines)
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
