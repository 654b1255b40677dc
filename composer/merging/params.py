"""The ``parameters:`` mapping of ``method: merge`` / ``method: moe_merge`` specs, validated.

Method parameters (weight, density, lambda, ...) are checked by merge/'s own pydantic models;
the keys handled here (method, calibration and its tokenisation) belong to the build. Every
error is a SpecError naming the spec file, the line of the offending key and
``parameters.<field>``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from composer.precision import Bf16Setting, parse_bf16
from composer.spec import SpecError
from merge.lora_combine import LORA_COMBINATIONS, LoraCombineParams
from merge.low_rank import LowRankParams
from merge.m_smoe import MSMoEParams, UniformMergeParams
from merge.methods import METHODS, names

# The merge/ algorithms each build method takes (``parameters.method``).
DENSE_ALGORITHMS = names("dense", "calibrated")  # method: merge
MOE_ALGORITHMS = names("moe")  # method: moe_merge
CALIBRATED_ALGORITHMS = names("calibrated")
# Build-level keys: the rest of ``parameters`` goes to the method's own parameter model.
_CALIBRATION_KEYS = ("calibration", "seq_len", "max_calibration_tokens", "batch_size")
# The precision of Expert Merging's forward passes (composer.precision): auto, true or false.
_PRECISION_KEY = "bf16"


class CalibrationSettings(BaseModel):
    """How calibration text becomes token batches (shared by expert_merging and m_smoe)."""

    model_config = ConfigDict(extra="forbid")

    seq_len: int = Field(128, ge=2)
    max_calibration_tokens: int = Field(2048, ge=1)  # per expert (merge) or in all (moe_merge)
    batch_size: int = Field(4, ge=1)


class MergeSettings(BaseModel):
    """Validated ``parameters`` of ``method: merge``."""

    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True)

    method: str
    params: BaseModel  # the merge/ parameter model of ``method``
    calibration: list[list[Path]] | None = None  # one file list per expert (calibrated methods)
    tokens: CalibrationSettings = Field(default_factory=CalibrationSettings)
    bf16: Bf16Setting = "auto"  # bf16 autocast of calibrated methods; auto: where native

    @property
    def calibrated(self) -> bool:
        return self.method in CALIBRATED_ALGORITHMS


class MoeMergeSettings(BaseModel):
    """Validated ``parameters`` of ``method: moe_merge``."""

    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True)

    method: Literal["m_smoe", "uniform"]
    params: MSMoEParams | UniformMergeParams
    calibration: list[Path] | None = None
    tokens: CalibrationSettings = Field(default_factory=CalibrationSettings)


def param_line(source: Path | None, loc: tuple[Any, ...]) -> int | None:
    """Line (1-based) of ``parameters.<loc>`` in the spec file: the deepest key that exists."""
    if source is None or not Path(source).is_file():
        return None
    try:
        node = yaml.compose(Path(source).read_text(), Loader=yaml.SafeLoader)
    except yaml.YAMLError:
        return None
    line = None
    for key in ("parameters", *loc):
        if isinstance(node, yaml.MappingNode):
            hit = [(k, v) for k, v in node.value if k.value == str(key)]
            if not hit:
                break
            line, node = hit[0][0].start_mark.line + 1, hit[0][1]
        elif isinstance(node, yaml.SequenceNode) and isinstance(key, int) and key < len(node.value):
            node = node.value[key]
            line = node.start_mark.line + 1
        else:
            break
    return line


def spec_error(spec: Any, loc: tuple[Any, ...], message: str) -> SpecError:
    """SpecError at ``parameters.<loc>`` of ``spec`` (a composer.spec.Spec)."""
    return SpecError(spec.source, param_line(spec.source, loc), _param_field(loc), message)


def param_where(spec: Any, loc: tuple[Any, ...]) -> str:
    """``file:line: parameters.<loc>`` of ``spec``, for plan errors (as Spec.where)."""
    return str(spec_error(spec, loc, "")).removesuffix(": ")


def _param_field(loc: tuple[Any, ...]) -> str:
    return "parameters" + "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc)


def _validate(spec: Any, model: type[BaseModel], data: dict[str, Any]) -> BaseModel:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        errs = exc.errors()
        # A misspelt key also makes its intended field "missing": report the misspelling.
        err = next((e for e in errs if e["type"] == "extra_forbidden"), errs[0])
        loc = tuple(err["loc"])
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "missing":
            msg = "required parameter missing"
        if err["type"] == "extra_forbidden":
            allowed = ", ".join(
                f.alias or k for k, f in model.model_fields.items() if k != "compress"
            )
            head = "" if "combination" in model.model_fields else "method, "
            msg = f"unknown parameter; expected one of {head}{allowed}"
        raise spec_error(spec, loc, msg) from None


def _split(spec: Any, known: tuple[str, ...]) -> tuple[str, dict[str, Any], dict[str, Any]]:
    raw = dict(spec.parameters or {})
    if "method" not in raw:
        raise spec_error(spec, (), f"needs 'method': one of {', '.join(known)}")
    method = raw.pop("method")
    if method not in known:
        raise spec_error(spec, ("method",), f"unknown value {method!r}; expected one of "
                         + ", ".join(known))  # fmt: skip
    build_keys = {k: raw.pop(k) for k in (*_CALIBRATION_KEYS, _PRECISION_KEY) if k in raw}
    return method, raw, build_keys


def _tokens(spec: Any, build_keys: dict[str, Any]) -> CalibrationSettings:
    data = {k: v for k, v in build_keys.items() if k in _CALIBRATION_KEYS and k != "calibration"}
    return _validate(spec, CalibrationSettings, data)  # type: ignore[return-value]


def _files(spec: Any, entries: Any, loc: tuple[Any, ...]) -> list[Path]:
    if isinstance(entries, str):
        entries = [entries]
    if not isinstance(entries, list) or not entries:
        raise spec_error(spec, loc, "expected a file or a non-empty list of files")
    out = []
    for i, e in enumerate(entries):
        if not isinstance(e, str):
            raise spec_error(spec, (*loc, i), f"expected a file path, got {e!r}")
        out.append(spec.resolve_path(e))
    return out


def _expert_weights(spec: Any, raw: dict[str, Any]) -> None:
    n = len(spec.experts)
    if "weight" not in raw and any(e.weight != 1.0 for e in spec.experts):
        raw["weight"] = [e.weight for e in spec.experts]  # per-expert weights of the experts list
    for key in ("weight", "density"):
        v = raw.get(key)
        if isinstance(v, list) and len(v) != n:
            raise spec_error(spec, (key,), f"has {len(v)} values for {n} experts")


def parse_lora_output_parameters(spec: Any) -> MergeSettings:
    """``parameters`` of a merge into an adapter (``output.format: lora``): ``combination``
    (PEFT's combination_type) instead of ``method``; ``method`` is refused, since PEFT's
    ``linear`` / ``ties`` / ``dare_*`` mean something else than the dense methods of those
    names (docs/adapters.md)."""
    raw = dict(spec.parameters or {})
    known = ", ".join(LORA_COMBINATIONS)
    if "method" in raw:
        raise spec_error(
            spec, ("method",), f"output.format lora takes 'combination' (one of {known}), "
            "not 'method'",
        )  # fmt: skip
    if "combination" not in raw:
        raise spec_error(spec, (), f"output.format lora needs 'combination': one of {known}")
    if raw["combination"] not in LORA_COMBINATIONS:
        raise spec_error(
            spec, ("combination",), f"unknown value {raw['combination']!r}; expected one of "
            + known,
        )  # fmt: skip
    _expert_weights(spec, raw)
    params = _validate(spec, LoraCombineParams, raw)
    return MergeSettings(method=str(raw["combination"]), params=params)


def parse_merge_parameters(spec: Any) -> MergeSettings:
    """``parameters`` of a ``method: merge`` spec -> MergeSettings (raises SpecError)."""
    if spec.output.format == "lora":
        return parse_lora_output_parameters(spec)
    method, raw, build_keys = _split(spec, DENSE_ALGORITHMS)
    n = len(spec.experts)
    _expert_weights(spec, raw)
    params = _validate(spec, METHODS[method].params, raw)
    calibration = None
    if method in CALIBRATED_ALGORITHMS:
        cal = build_keys.get("calibration")
        if not isinstance(cal, list) or len(cal) != n:
            got = len(cal) if isinstance(cal, list) else 0
            raise spec_error(
                spec, ("calibration",), f"{method} needs one file list per expert ({n}), got {got}"
            )
        calibration = [_files(spec, c, ("calibration", i)) for i, c in enumerate(cal)]
    elif "calibration" in build_keys:
        raise spec_error(spec, ("calibration",), f"method {method!r} uses no calibration data")
    return MergeSettings(
        method=method,
        params=params,
        calibration=calibration,
        tokens=_tokens(spec, build_keys),
        bf16=_bf16(spec, method, build_keys),
    )


def _no_bf16(method: str) -> str:
    return f"only {' and '.join(CALIBRATED_ALGORITHMS)} take bf16, not method {method!r}"


def _bf16(spec: Any, method: str, build_keys: dict[str, Any]) -> Any:
    """``parameters.bf16`` (auto, true or false) of a calibrated method; others run no model."""
    if _PRECISION_KEY not in build_keys:
        return "auto"
    if method not in CALIBRATED_ALGORITHMS:
        raise spec_error(spec, (_PRECISION_KEY,), _no_bf16(method))
    try:
        return parse_bf16(build_keys[_PRECISION_KEY])
    except ValueError as e:
        raise spec_error(spec, (_PRECISION_KEY,), str(e)) from None


def parse_moe_merge_parameters(spec: Any) -> MoeMergeSettings:
    """``parameters`` of a ``method: moe_merge`` spec -> MoeMergeSettings (raises SpecError)."""
    method, raw, build_keys = _split(spec, MOE_ALGORITHMS)
    if _PRECISION_KEY in build_keys:
        raise spec_error(spec, (_PRECISION_KEY,), _no_bf16(method))
    if method == "m_smoe":
        compress = raw.pop("compress", None)
        low_rank = {k: raw.pop(k) for k in ("rank", "sparse_density", "iters") if k in raw}
        if compress not in (None, "low_rank"):
            raise spec_error(spec, ("compress",), f"unknown value {compress!r}; expected low_rank")
        if compress is None and low_rank:
            key = next(iter(low_rank))
            raise spec_error(spec, (key,), "only used with compress: low_rank")
        if compress is not None:
            if "rank" not in low_rank:
                raise spec_error(spec, ("compress",), "low_rank needs 'rank'")
            raw["compress"] = _validate(spec, LowRankParams, low_rank)
        params: BaseModel = _validate(spec, METHODS[method].params, raw)
        cal = build_keys.get("calibration")
        if cal is None:
            raise spec_error(spec, ("calibration",), "m_smoe needs calibration text files")
        calibration: list[Path] | None = _files(spec, cal, ("calibration",))
    else:
        params = _validate(spec, METHODS[method].params, raw)
        if "calibration" in build_keys:
            raise spec_error(spec, ("calibration",), "uniform merging uses no calibration data")
        calibration = None
    return MoeMergeSettings(
        method=method,
        params=params,  # type: ignore[arg-type]
        calibration=calibration,
        tokens=_tokens(spec, build_keys),
    )
