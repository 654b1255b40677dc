"""The YAML build spec: pydantic v2 models (composer.spec_load reads a file into them, with
errors that name file, line and field).

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

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    SerializerFunctionWrapHandler,
    field_validator,
    model_serializer,
)

from composer.precision import Bf16Setting
from composer.spec_lines import field_name, line_for
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
    # merge only: "lora" writes a merged PEFT adapter instead of a checkpoint (docs/adapters.md)
    format: Literal["checkpoint", "lora"] = "checkpoint"

    @model_serializer(mode="wrap")
    def _dump(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        # The default format is left out, so specs written before it existed keep their
        # canonical JSON and spec_sha256 (and their builds stay byte-identical).
        out = handler(self)
        if self.format == "checkpoint":
            out.pop("format", None)
        return out

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
    # compose with LoRA experts: "materialised" (default) writes base FFN + B @ A per expert as a
    # standard Mixtral / FlexOlmo checkpoint; "shared" writes one base FFN per layer plus every
    # expert's factors (ComposerLoraMoeForCausalLM, models/lora_moe.py). docs/adapters.md.
    lora: Literal["materialised", "shared"] | None = None

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

    @model_serializer(mode="wrap")
    def _omit_unset_lora(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        # Specs without `lora` dump (and hash) exactly as before the field existed, so builds
        # of existing specs stay byte-identical.
        out = handler(self)
        if out.get("lora", "") is None:
            del out["lora"]
        return out

    @property
    def lora_mode(self) -> str:
        return self.lora or "materialised"

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
        return f"{where}: {field_name(tuple(loc))}"

    def line(self, *loc: Any) -> int | None:
        """The line of a spec location (its deepest key that the YAML has), None if unknown."""
        return line_for(tuple(loc), self._lines) if self._lines else None

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
