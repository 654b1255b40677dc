"""Bad inputs are refused with the project's errors, naming the file, field, tensor or owner."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path
from typing import Literal

import pytest
import torch
from mergebuild_helpers import build_text, write_spec
from safetensors.torch import load_file, save_file

from composer.build import build
from composer.errors import BuildError, OptedOutError, PlanError
from composer.inputs import LocalPathResolver, ResolvedInput
from composer.merging.plan import plan_merge
from composer.spec import SpecError
from composer.spec_load import load_spec
from registry.errors import ComposerError

HEAD = "method: merge\nbase: base\nexperts: [code, legal]\n"


def _plan(models: Path, text: str, name: str = "bad.yaml") -> None:
    spec = load_spec(write_spec(models, text, name))
    plan_merge(spec, LocalPathResolver(models, hash_inputs=False))


@pytest.mark.parametrize("density", ["1.5", "0", "[0.5, -0.1]"])
def test_density_outside_range(models: Path, density: str) -> None:
    text = HEAD + f"parameters:\n  method: ties\n  density: {density}\n"
    with pytest.raises(SpecError) as exc:
        _plan(models, text)
    e = exc.value
    assert e.path.endswith("bad.yaml") and e.line == 6 and e.field.startswith("parameters.density")
    assert "(0, 1]" in str(e)


def test_unknown_method_and_parameter(models: Path) -> None:
    with pytest.raises(SpecError, match=r"bad.yaml:5: parameters.method: unknown value 'slerp'"):
        _plan(models, HEAD + "parameters:\n  method: slerp\n")
    with pytest.raises(SpecError, match=r"bad.yaml:6: parameters.densty: unknown parameter"):
        _plan(models, HEAD + "parameters:\n  method: ties\n  densty: 0.5\n")
    with pytest.raises(SpecError, match=r"parameters.weight: has 3 values for 2 experts"):
        _plan(models, HEAD + "parameters: {method: linear, weight: [1, 2, 3]}\n")
    with pytest.raises(SpecError, match=r"parameters: needs 'method'"):
        _plan(models, HEAD + "parameters: {density: 0.5}\n")


def test_missing_calibration_file_is_named(models: Path) -> None:
    text = (
        HEAD + "parameters: {method: expert_merging, calibration: [cal/code.txt, cal/nope.txt]}\n"
    )
    with pytest.raises(PlanError, match=r"nope\.txt does not exist"):
        _plan(models, text)
    with pytest.raises(SpecError, match=r"parameters.calibration: expert_merging needs one file"):
        _plan(models, HEAD + "parameters: {method: expert_merging, calibration: [cal/code.txt]}\n")


def test_different_architecture_is_refused(models: Path) -> None:
    with pytest.raises(PlanError, match=r"expert 'wide': intermediate_size is 320"):
        _plan(
            models,
            "method: merge\nbase: base\nexperts: [code, wide]\nparameters: {method: linear}\n",
        )


def test_different_tensor_shape_names_tensor_and_expert(models: Path, tmp_path: Path) -> None:
    # Same config, one tensor of another shape: only the tensor headers can tell.
    bad = models / "odd"
    if not bad.exists():
        shutil.copytree(models / "code", bad)
        sd = load_file(bad / "model.safetensors")
        k = "model.layers.1.mlp.down_proj.weight"
        sd[k] = torch.zeros(sd[k].shape[0], sd[k].shape[1] - 1)
        save_file(sd, bad / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(PlanError, match=r"expert 'odd': tensor model.layers.1.mlp.down_proj"):
        _plan(
            models,
            "method: merge\nbase: base\nexperts: [code, odd]\nparameters: {method: linear}\n",
        )


class OptOutResolver:
    """Local folders; the expert 'legal' belongs to an owner who opted out."""

    def __init__(self, root: Path):
        self.local = LocalPathResolver(root, hash_inputs=False)

    def resolve(self, ref: str, *, role: Literal["base", "expert"]) -> ResolvedInput:
        r = self.local.resolve(ref, role=role)
        if ref == "legal":
            return dataclasses.replace(r, owner="acme-law", policy="opt_out")
        return dataclasses.replace(r, owner="someone", policy="opt_in")


def test_opted_out_expert_is_refused(models: Path, tmp_path: Path) -> None:
    spec = load_spec(write_spec(models, HEAD + "parameters: {method: linear}\n", "optout.yaml"))
    with pytest.raises(OptedOutError, match=r"'legal' \(owner acme-law\)"):
        build(spec, tmp_path / "out", OptOutResolver(models), progress=False)
    assert not (tmp_path / "out").exists()


def test_moe_merge_refusals(models: Path) -> None:
    with pytest.raises(SpecError, match=r"parameters.num_experts: is 1; it must lie in \[2, 4\]"):
        _plan(
            models, "method: moe_merge\nbase: moe\nparameters: {method: uniform, num_experts: 1}\n"
        )
    with pytest.raises(SpecError, match=r"parameters.calibration: m_smoe needs calibration"):
        _plan(
            models, "method: moe_merge\nbase: moe\nparameters: {method: m_smoe, num_experts: 2}\n"
        )
    with pytest.raises(PlanError, match=r"needs a Mixtral checkpoint, got model_type 'llama'"):
        _plan(
            models, "method: moe_merge\nbase: base\nparameters: {method: uniform, num_experts: 2}\n"
        )
    with pytest.raises(SpecError, match=r"parameters.rank: only used with compress: low_rank"):
        params = "{method: m_smoe, num_experts: 2, rank: 4, calibration: cal/code.txt}"
        _plan(models, f"method: moe_merge\nbase: moe\nparameters: {params}\n")


def test_failed_build_leaves_nothing(models: Path, tmp_path: Path) -> None:
    # lambda * weight = 2 lies outside (0, c_max=1): merge/ refuses it once the build runs.
    text = HEAD + (
        "parameters: {method: expert_merging, lambda: 2.0, steps: 1, seq_len: 32,"
        " calibration: [cal/code.txt, cal/legal.txt]}\n"
    )
    out = tmp_path / "out"
    with pytest.raises(BuildError, match=r"initial coefficient"):
        build_text(models, out, text)
    assert list(tmp_path.iterdir()) == []  # neither the output nor a temporary folder


def test_existing_output_is_refused(models: Path, tmp_path: Path) -> None:
    (tmp_path / "out").mkdir()
    with pytest.raises(BuildError, match="already exists"):
        build_text(models, tmp_path / "out", HEAD + "parameters: {method: linear}\n")


def test_bf16_parameter_is_checked(models: Path) -> None:
    cal = "calibration: [[cal/code.txt], [cal/legal.txt]]"
    with pytest.raises(SpecError, match=r"bad.yaml:4: parameters.bf16: expected auto, true or"):
        _plan(models, HEAD + f"parameters: {{method: expert_merging, bf16: maybe, {cal}}}\n")
    with pytest.raises(SpecError, match=r"parameters.bf16: only expert_merging and expert_merg"):
        _plan(models, HEAD + "parameters: {method: linear, bf16: true}\n")


@pytest.mark.parametrize(
    ("text", "line", "field"),
    [
        (HEAD + "parameters:\n  method: expert_merging\n  calibration:\n    - [cal/code.txt]\n"
         "    - [cal/code.txt, cal/nope.txt]\n", 8, "parameters.calibration[1][1]"),
        ("method: merge\nbase: base\nexperts:\n  - code\n  - wide\nparameters: {method: linear}\n",
         5, "experts[1]"),
        ("method: merge\nbase: base\nexperts:\n  - code\n  - nowhere\n"
         "parameters: {method: linear}\n", 5, "experts[1]"),
        ("method: moe_merge\nbase: base\nparameters: {method: uniform, num_experts: 2}\n", 2,
         "base"),
    ],
)  # fmt: skip
def test_plan_errors_name_file_line_and_field(
    models: Path, text: str, line: int, field: str
) -> None:
    spec_path = write_spec(models, text, "where.yaml")
    with pytest.raises(ComposerError) as exc:
        plan_merge(load_spec(spec_path), LocalPathResolver(models, hash_inputs=False))
    assert str(exc.value).startswith(f"{spec_path.resolve()}:{line}: {field}: "), str(exc.value)
