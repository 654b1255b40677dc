"""The planner: what a build will do, and the refusals it can give before reading any weight."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Literal

import pytest
from build_helpers import build_text, write_expert_file, write_spec

from composer.build import BUILD_METHODS, plan_for
from composer.compose.arch import FLEXOLMO, MIXTRAL
from composer.compose.plan import Plan, make_plan
from composer.errors import BuildError, OptedOutError, PlanError
from composer.inputs import LocalPathResolver, ResolvedInput, ResolveError
from composer.spec import METHODS
from composer.spec_load import load_spec
from composer.tiny_models import make_tiny_llama, perturb_ffn
from registry.errors import ComposerError

FLEX = "method: compose\nstyle: flexolmo\nbase: base\nexperts: [code, legal]\n"


def _plan(models: Path, tmp_path: Path, text: str) -> Plan:
    spec = load_spec(write_spec(tmp_path, text))
    return make_plan(spec, LocalPathResolver(models, hash_inputs=False))


def test_flexolmo_plan(models: Path, tmp_path: Path) -> None:
    plan = _plan(models, tmp_path, FLEX + "top_k: 1\n")
    assert plan.method == "compose/flexolmo" and plan.arch is MIXTRAL
    assert plan.expert_names == ["public", "code", "legal"] and plan.num_experts == 3
    assert (plan.top_k, plan.norm_topk_prob, plan.router_init) == (1, True, "domain_embedding")
    assert (plan.moe_layers, plan.dense_layers, plan.dtype) == ([0, 1], [], "float32")
    assert [s.name for s in plan.steps] == ["resolve", "verify", "router", "write", "finish"]
    assert any("public_calibration" in n for n in plan.notes)
    assert plan.base.path == (models / "base").resolve() and plan.base.kind == "base"
    assert [e.kind for e in plan.experts] == ["ffn", "ffn"]
    text = str(plan)
    for fragment in (
        "compose/flexolmo",
        "MixtralForCausalLM, 3 experts, top-1",
        "expert 0",
        "public",
        "bit-identical",
        "init 'domain_embedding' for 2 MoE layers",
    ):
        assert fragment in text, fragment
    # plan_for gives the same plan for these methods.
    spec = load_spec(write_spec(tmp_path, FLEX))
    assert plan_for(spec, LocalPathResolver(models)).expert_names == plan.expert_names


def test_upcycle_plan_layers_and_calibration_step(models: Path, tmp_path: Path) -> None:
    text = (
        "method: upcycle\nbase: olmo\nnum_experts: 4\nmoe_layers: {every: 2, offset: 1}\n"
        f"router:\n  init: hidden_mean\n  calibration: [{', '.join(['a.txt'] * 4)}]\n"
    )
    (tmp_path / "a.txt").write_text("calibration text")
    plan = _plan(models, tmp_path, text)
    assert plan.arch is FLEXOLMO and plan.norm_topk_prob is True  # upcycling stays exact
    assert (plan.moe_layers, plan.dense_layers) == ([1], [0])
    assert plan.expert_names == ["expert0", "expert1", "expert2", "expert3"]
    assert "calibrate" in [s.name for s in plan.steps]
    assert any("layers 0 have no experts" in n for n in plan.notes)
    lines = str(plan).splitlines()
    assert re.search(r"^moe layers\s+1$", str(plan), re.M) and re.search(
        r"^dense layers\s+0$", str(plan), re.M
    ), lines
    flex = _plan(
        models,
        tmp_path,
        "method: compose\nstyle: flexolmo\nbase: olmo\nexperts: [olmo_code]\ntop_k: 1\n",
    )
    assert flex.arch is FLEXOLMO and flex.norm_topk_prob is False


@pytest.mark.parametrize(
    ("text", "error", "match"),
    [
        (
            "method: upcycle\nbase: base\nnum_experts: 2\nmoe_layers: [0, 2]\n",
            PlanError,
            r"moe_layers\[1\]: layer 2 out of range \(the base has 2\)",
        ),
        (
            FLEX + "norm_topk_prob: false\n",
            PlanError,
            r"norm_topk_prob: false is not expressible in MixtralForCausalLM",
        ),
        (
            "method: compose\nstyle: flexolmo\nbase: base\nexperts: [code, plain]\n",
            PlanError,
            r"expert 'plain' has no composer_expert.safetensors \(router init 'domain_embedding'",
        ),
        (
            "method: compose\nstyle: flexolmo\nbase: base\nexperts: [{ref: code, name: public}]\n",
            PlanError,
            r"duplicate expert names \['public', 'public'\]",
        ),
        (
            "method: compose\nstyle: btx\nbase: base\nexperts: [ft1, olmo]\n",
            PlanError,
            r"expert 'olmo': model_type is 'olmo2', the base has 'llama'",
        ),
        (
            "method: upcycle\nbase: nowhere\nnum_experts: 2\n",
            ResolveError,
            r"'nowhere' is not a checkpoint folder \(no config.json at .*nowhere\)",
        ),
    ],
)
def test_plan_refusals(
    models: Path, tmp_path: Path, text: str, error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=match):
        _plan(models, tmp_path, text)


def test_plan_refusals_of_the_inputs(models: Path, tmp_path: Path) -> None:
    make_tiny_llama(tmp_path / "wide", seed=0, intermediate_size=192)
    text = f"method: compose\nstyle: btx\nbase: base\nexperts: [ft1, {tmp_path / 'wide'}]\n"
    with pytest.raises(
        PlanError, match=r"expert 'wide': intermediate_size is 192, the base has 256"
    ):
        _plan(models, tmp_path, text)
    other = tmp_path / "gpt"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"model_type": "gpt2", "num_hidden_layers": 2}))
    with pytest.raises(PlanError, match=r"base: base model_type 'gpt2' is not supported"):
        _plan(models, tmp_path, f"method: upcycle\nbase: {other}\nnum_experts: 2\n")


def test_expert_file_without_a_moe_layer_is_refused(models: Path, tmp_path: Path) -> None:
    half = perturb_ffn(models / "base", tmp_path / "half", seed=9)
    write_expert_file(half, layers=[0], seed=1, bias=-1.0)
    text = f"method: compose\nstyle: flexolmo\nbase: base\nexperts: [{half}]\n"
    with pytest.raises(
        PlanError,
        match=r"expert 'half' has no domain_embedding for MoE layer 1 \(trained layers: 0\)",
    ):
        build_text(models, tmp_path / "out", text)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.tmp-*"))
    # The layers the file has are enough when only they get experts.
    res = build_text(models, tmp_path / "ok", text + "moe_layers: [0]\n")
    assert res.plan is not None and res.plan.dense_layers == [1]


class ConsentResolver:
    """Local folders with the owner and policy a registry would attach."""

    def __init__(self, models: Path, policies: dict[str, tuple[str, str]]):
        self.local = LocalPathResolver(models, hash_inputs=False)
        self.policies = policies

    def resolve(self, ref: str, *, role: Literal["base", "expert"]) -> ResolvedInput:
        r = self.local.resolve(ref, role=role)
        owner, policy = self.policies.get(ref, ("public", "opt_in"))
        return dataclasses.replace(r, owner=owner, policy=policy)


def test_opted_out_inputs_are_all_named(models: Path, tmp_path: Path) -> None:
    spec = load_spec(write_spec(tmp_path, FLEX))
    resolver = ConsentResolver(models, {"code": ("alice", "opt_out"), "legal": ("bob", "opt_out")})
    with pytest.raises(OptedOutError) as exc:
        make_plan(spec, resolver)
    assert isinstance(exc.value, BuildError)
    msg = str(exc.value)
    assert "'code' (owner alice)" in msg and "'legal' (owner bob)" in msg
    # Restricted (not opted-out) inputs are fine; the plan shows owner and policy.
    ok = make_plan(spec, ConsentResolver(models, {"code": ("alice", "restricted")}))
    assert "owner alice, restricted" in str(ok)


@pytest.mark.parametrize(
    ("calibration", "match"),
    [
        ("[cal/code.txt, cal/nope.txt]", r"router.calibration\[1\]: .*cal/nope.txt does not exist"),
        ("[cal/code.txt, cal/empty.txt]", r"router.calibration\[1\]: .*cal/empty.txt is empty"),
        ("[cal/code.txt, []]", r"router.calibration\[1\]: names no file"),
    ],
)
def test_calibration_files_are_checked_before_building(
    models: Path, tmp_path: Path, calibration: str, match: str
) -> None:
    """A missing or empty calibration text is a PlanError up front (one "error:" line in the
    CLI), not an OSError / ValueError from the router step halfway through the build."""
    (tmp_path / "cal").mkdir()
    (tmp_path / "cal" / "code.txt").write_text("def f(): pass\n")
    (tmp_path / "cal" / "empty.txt").write_text("")
    text = (
        "method: upcycle\nbase: base\nnum_experts: 2\n"
        f"router:\n  init: hidden_mean\n  calibration: {calibration}\n"
    )
    with pytest.raises(PlanError, match=match):
        _plan(models, tmp_path, text)  # paths are relative to the spec, in tmp_path
    flex = FLEX + "router:\n  public_calibration: [cal/nope.txt]\n"
    with pytest.raises(PlanError, match=r"router.public_calibration: .*nope.txt does not exist"):
        _plan(models, tmp_path, flex)


@pytest.mark.parametrize(
    ("text", "line", "field"),
    [
        ("method: upcycle\nbase: base\nnum_experts: 2\nmoe_layers: [0, 9]\n", 4, "moe_layers[1]"),
        ("method: upcycle\nbase: nowhere\nnum_experts: 2\n", 2, "base"),
        ("method: compose\nstyle: btx\nbase: base\nexperts:\n  - ft1\n  - olmo\n", 6, "experts[1]"),
        ("method: compose\nstyle: btx\nbase: base\nexperts: [ft1, nowhere]\n", 4, "experts[1]"),
        (FLEX + "norm_topk_prob: false\n", 5, "norm_topk_prob"),
        ("method: compose\nstyle: flexolmo\nbase: base\nexperts:\n  - code\n  - plain\n", 6,
         "experts[1]"),
        ("method: compose\nstyle: flexolmo\nbase: olmo\nexperts: [olmo_code]\n"
         "moe_layers: [0]\nnorm_topk_prob: true\ntop_k: 1\nrouter:\n  tune:\n"
         "    proxy: {olmo_code: nope/*.txt}\n", 10, "router.tune.proxy.olmo_code"),
        ("method: upcycle\nbase: base\nnum_experts: 2\nrouter:\n  init: hidden_mean\n"
         "  calibration:\n    - cal/a.txt\n    - cal/nope.txt\n", 8, "router.calibration[1]"),
    ],
)  # fmt: skip
def test_plan_errors_name_file_line_and_field(
    models: Path, tmp_path: Path, text: str, line: int, field: str
) -> None:
    """Plan-time errors carry ``file:line: field:`` like schema errors (the CLI prints them)."""
    (tmp_path / "cal").mkdir()
    (tmp_path / "cal" / "a.txt").write_text("text")
    spec_path = write_spec(tmp_path, text)
    with pytest.raises(ComposerError) as exc:
        make_plan(load_spec(spec_path), LocalPathResolver(models, hash_inputs=False))
    assert str(exc.value).startswith(f"{spec_path.resolve()}:{line}: {field}: "), str(exc.value)


def test_opted_out_input_names_its_line(models: Path, tmp_path: Path) -> None:
    spec_path = write_spec(tmp_path, FLEX)
    resolver = ConsentResolver(models, {"legal": ("bob", "opt_out")})
    with pytest.raises(OptedOutError) as exc:
        make_plan(load_spec(spec_path), resolver)
    assert str(exc.value).startswith(f"{spec_path.resolve()}:4: experts[1]: refused: ")


def test_every_spec_method_has_a_build_method() -> None:
    """The schema's method names (composer.spec, which cannot import the build) and the build
    table are two lists of the same names: a method added to one only is caught here."""
    assert tuple(BUILD_METHODS) == METHODS
