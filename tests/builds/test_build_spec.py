"""Spec validation: every error is a SpecError naming the file, the line and the field."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from build_helpers import write_spec

from composer.spec import SpecError
from composer.spec_load import load_spec, parse_spec

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"

UPCYCLE = "method: upcycle\nbase: base\nnum_experts: 4\n"  # lines 1-3
FLEX = "method: compose\nstyle: flexolmo\nbase: base\nexperts: [code, legal]\n"  # lines 1-4


def _error(tmp_path: Path, text: str) -> SpecError:
    path = write_spec(tmp_path, text, "bad.yaml")
    with pytest.raises(SpecError) as exc:
        load_spec(path)
    e = exc.value
    assert e.path == str(path)
    # str() is exactly "file:line: field: message" (one line).
    what = f"{e.field}: {e.message}" if e.field else e.message
    assert str(e) == f"{path}:{e.line}: {what}"
    assert "\n" not in str(e)
    return e


def test_unknown_top_level_field(tmp_path: Path) -> None:
    e = _error(tmp_path, UPCYCLE + "# a comment\ntopk: 2\n")
    assert (e.line, e.field) == (5, "topk")
    assert e.message.startswith("unknown field; expected one of ")
    assert "top_k" in e.message and "num_experts" in e.message
    assert str(e) == f"{tmp_path / 'bad.yaml'}:5: topk: {e.message}"


def test_unknown_nested_fields_name_their_path(tmp_path: Path) -> None:
    e = _error(tmp_path, UPCYCLE + "router:\n  init: random\n  temprature: 1.0\n")
    assert (e.line, e.field) == (6, "router.temprature")
    assert "gating_logit_norm" in e.message  # the fields of the router section
    e = _error(tmp_path, FLEX.replace("[code, legal]", "\n  - code\n  - {ref: legal, wieght: 2}"))
    assert (e.line, e.field) == (6, "experts[1].wieght")
    assert "weight" in e.message and "ref" in e.message
    e = _error(tmp_path, UPCYCLE + "output:\n  dtype: float32\n  shard: 1GB\n")
    assert (e.line, e.field) == (6, "output.shard")


def test_bad_method_lists_the_methods(tmp_path: Path) -> None:
    e = _error(tmp_path, "base: base\nmethod: upcycel\nnum_experts: 4\n")
    assert str(e) == (
        f"{tmp_path / 'bad.yaml'}:2: method: unknown value 'upcycel'; "
        "expected one of upcycle, compose, merge, moe_merge"
    )


@pytest.mark.parametrize(
    ("text", "line", "field", "fragment"),
    [
        (UPCYCLE + "top_k: 0\n", 4, "top_k", "must be >= 1, got 0"),
        (UPCYCLE.replace("4", "300"), 3, "num_experts", "must be <= 256, got 300"),
        (UPCYCLE.replace("4", "four"), 3, "num_experts", "expected an integer, got 'four'"),
        (UPCYCLE + "seed: -1\n", 4, "seed", "must be >= 0"),
        (UPCYCLE + "style: btx\n", 4, "style", "only method 'compose' takes a style"),
        (UPCYCLE + "router: {init: learned}\n", 4, "router.init", "unknown value 'learned'"),
        (UPCYCLE + "router: random\n", 4, "router", "expected a mapping"),
        (UPCYCLE + "output:\n  dtype: float8\n", 5, "output.dtype", "unknown value 'float8'"),
        (UPCYCLE + "output:\n  max_shard_size: 2 parsecs\n", 5, "output.max_shard_size", "2GB"),
        (UPCYCLE + "output:\n  max_shard_size: -5MB\n", 5, "output.max_shard_size", "positive"),
        (UPCYCLE + "output:\n  max_shard_size: 0GB\n", 5, "output.max_shard_size", "positive"),
        (UPCYCLE + "output:\n  max_shard_size: 0\n", 5, "output.max_shard_size", "positive"),
        (UPCYCLE + "output:\n  max_shard_size: infGB\n", 5, "output.max_shard_size", "2GB"),
        (UPCYCLE + "moe_layers: some\n", 4, "moe_layers", "expected 'all', a list of layer"),
        (UPCYCLE + "moe_layers: {every: 0}\n", 4, "moe_layers.every", "must be >= 1"),
        (UPCYCLE + "norm_topk_prob: maybe\n", 4, "norm_topk_prob", "expected true or false"),
        (UPCYCLE + "name: my model\n", 4, "name", "'my model' is not a valid name"),
        (UPCYCLE.replace("base: base", "base: ''"), 2, "base", "must not be empty"),
        ("method: upcycle\nnum_experts: 2\n", 1, "base", "required field missing"),
        (UPCYCLE + "expert_names: [a, b]\n", 4, "expert_names", "expected 4 names"),
        (UPCYCLE + "experts: [code]\n", 4, "experts", "use num_experts"),
        (UPCYCLE + "top_k: 5\n", 4, "top_k", "must be <= the number of experts (4), got 5"),
        (
            UPCYCLE + "router:\n  init: domain_embedding\n",
            5,
            "router.init",
            "'domain_embedding' is not available for upcycle",
        ),
        (
            UPCYCLE + "router:\n  init: hidden_mean\n  calibration: [a.txt]\n",
            6,
            "router.calibration",
            "one calibration entry per expert (4), got 1",
        ),
        (
            UPCYCLE + "router:\n  init: given\n",
            4,
            "router.weights",
            "router init 'given' needs router.weights",
        ),
        (
            UPCYCLE + "router:\n  gating_logit_norm: 1.0\n",
            5,
            "router.gating_logit_norm",
            "calibrated on router.calibration",
        ),
        ("method: upcycle\nbase: base\n", 1, "method", "needs num_experts"),
        (FLEX.replace("style: flexolmo\n", ""), 1, "method", "needs a style"),
        (FLEX + "num_experts: 3\n", 5, "num_experts", "fixes the expert count"),
        (FLEX + "top_k: 4\n", 5, "top_k", "(3), got 4"),  # flexolmo: public + 2 experts
        (FLEX.replace("legal]", "code]"), 4, "experts", "duplicate expert names: code"),
        (FLEX.replace("flexolmo", "btx").replace(", legal", ""), 4, "experts", "at least two"),
        (
            FLEX.replace("flexolmo", "btx") + "router: {init: domain_embedding}\n",
            5,
            "router.init",
            "expected one of random, given",
        ),  # fmt: skip
        (FLEX.replace("flexolmo", "moe"), 2, "style", "unknown value 'moe'"),
        (
            FLEX.replace("[code, legal]", "[{ref: code, weight: 0}, legal]"),
            4,
            "experts[0].weight",
            "must be > 0",
        ),  # fmt: skip
        (FLEX.replace("[code, legal]", "[{name: x}]"), 4, "experts[0].ref", "required"),
    ],
)
def test_bad_values(tmp_path: Path, text: str, line: int, field: str, fragment: str) -> None:
    e = _error(tmp_path, text)
    assert (e.line, e.field) == (line, field), str(e)
    assert fragment in e.message, str(e)
    assert str(e).startswith(f"{tmp_path / 'bad.yaml'}:{line}: {field}: ")


@pytest.mark.parametrize(
    ("text", "line"),
    [
        ("method: upcycle\nbase: [unclosed\nnum_experts: 4\n", 3),
        ("method: upcycle\nbase: base\n  num_experts: 4\n", 3),
        ("method: upcycle\nrouter:\n  init: random\n\tseed: 1\n", 4),
    ],
)
def test_yaml_syntax_error_names_the_line(tmp_path: Path, text: str, line: int) -> None:
    e = _error(tmp_path, text)
    assert e.line == line
    assert e.message.startswith("invalid YAML")
    assert str(e).startswith(f"{tmp_path / 'bad.yaml'}:{line}: invalid YAML")


def test_not_a_mapping_and_missing_file(tmp_path: Path) -> None:
    e = _error(tmp_path, "- method: upcycle\n")
    assert e.line == 1 and "expected a mapping" in e.message
    e = _error(tmp_path, "")
    assert e.line == 1 and "expected a mapping" in e.message
    with pytest.raises(SpecError, match=r"nope\.yaml: cannot read spec"):
        load_spec(tmp_path / "nope.yaml")


def test_parse_without_a_file_says_spec() -> None:
    with pytest.raises(SpecError, match=r"^<spec>:1: method: unknown value 'x'"):
        parse_spec("method: x\nbase: b\n")


def test_shorthands_defaults_and_paths(tmp_path: Path) -> None:
    text = (
        "method: compose\nstyle: btx\nbase: ../base\n"
        "experts: [a, {ref: b, name: bee, weight: 2}]\n"
        "router:\n  init: given\n  weights: routers.safetensors\n"
    )
    spec = load_spec(write_spec(tmp_path / "specs", text))
    assert [(e.ref, e.name, e.weight) for e in spec.experts] == [
        ("a", None, 1.0),
        ("b", "bee", 2.0),
    ]
    assert spec.top_k == 2 and spec.moe_layers == "all" and spec.seed == 0
    assert spec.output.dtype == "auto" and spec.router.expert_bias is True
    assert spec.n_experts == 2
    assert spec.source == (tmp_path / "specs" / "spec.yaml").resolve()
    assert spec.resolve_path("routers.safetensors") == spec.source.parent / "routers.safetensors"
    assert spec.resolve_path("/abs/x") == Path("/abs/x")
    flex = parse_spec(FLEX)
    assert flex.n_experts == 3  # the public model is expert 0
    cal = parse_spec(UPCYCLE + "router:\n  init: hidden_mean\n  calibration: [a, b, [c, d], e]\n")
    assert cal.router.calibration == [["a"], ["b"], ["c", "d"], ["e"]]


def test_spec_hash_ignores_comments_and_layout() -> None:
    a = parse_spec(UPCYCLE + "top_k: 2\n")
    b = parse_spec("# note\nnum_experts: 4\nbase:   base\nmethod: upcycle   # why\n")
    c = parse_spec(UPCYCLE + "top_k: 1\n")
    assert re.fullmatch(r"[0-9a-f]{64}", a.sha256())
    assert a.sha256() == b.sha256()  # top_k 2 is the default
    assert a.sha256() != c.sha256()


@pytest.mark.parametrize(
    "name",
    [
        "upcycle.yaml",
        "upcycle_hidden_mean.yaml",
        "flexmix.yaml",
        "btx.yaml",
        "lora_materialised.yaml",
        "lora_shared.yaml",
    ],
)
def test_examples_are_valid(name: str) -> None:
    spec = load_spec(EXAMPLES / name)
    assert spec.method in ("upcycle", "compose")
    if spec.router.calibration:
        for files in spec.router.calibration:
            for f in files:
                assert spec.resolve_path(f).is_file(), f
