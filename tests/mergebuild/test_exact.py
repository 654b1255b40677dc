"""Exactness of merge builds against the maths and against merge/ on loaded state dicts."""

from __future__ import annotations

from pathlib import Path

import torch
from mergebuild_helpers import build_text, raw_tensors, tensors

from merge.state_dict import merge_state_dicts


def test_task_arithmetic_lambda_zero_is_base_bitwise(models: Path, tmp_path: Path) -> None:
    text = (
        "method: merge\nbase: base\nexperts: [code, legal]\n"
        "parameters: {method: task_arithmetic, lambda: 0.0}\n"
    )
    out = tensors(build_text(models, tmp_path / "ta0", text).out_dir)
    base = raw_tensors(models / "base")
    assert out.keys() == base.keys()
    for k, t in base.items():
        assert out[k].dtype == t.dtype and torch.equal(out[k], t), k


def test_ties_one_expert_density_one_is_that_expert(models: Path, tmp_path: Path) -> None:
    text = (
        "method: merge\nbase: base\nexperts: [code]\n"
        "parameters: {method: ties, density: 1.0, lambda: 1.0}\n"
    )
    out = tensors(build_text(models, tmp_path / "ties1", text).out_dir)
    expert = raw_tensors(models / "code")
    for k, t in expert.items():
        # base + (expert - base) in float32: equal up to one rounding of the subtraction.
        torch.testing.assert_close(out[k], t, rtol=0, atol=1e-6, msg=k)
    assert any(not torch.equal(out[k], raw_tensors(models / "base")[k]) for k in expert)


def test_linear_build_equals_merge_state_dicts(models: Path, tmp_path: Path) -> None:
    text = (
        "method: merge\nbase: base\n"
        "experts: [{ref: code, weight: 3.0}, {ref: legal, weight: 1.0}]\n"
        "parameters: {method: linear}\n"
    )
    out = tensors(build_text(models, tmp_path / "lin", text).out_dir)
    base = raw_tensors(models / "base")
    experts = [raw_tensors(models / "code"), raw_tensors(models / "legal")]
    want = merge_state_dicts("linear", base, experts, {"weight": [3.0, 1.0]})
    assert out.keys() == want.keys()
    for k, t in want.items():
        assert torch.equal(out[k], t), k
    # And the weights mattered: 3:1 is not the plain average.
    avg = merge_state_dicts("linear", base, experts, {})
    assert not torch.equal(out["model.layers.0.mlp.up_proj.weight"],
                           avg["model.layers.0.mlp.up_proj.weight"])  # fmt: skip


def test_parameters_weight_overrides_entries(models: Path, tmp_path: Path) -> None:
    text = (
        "method: merge\nbase: base\nexperts: [code, legal]\n"
        "parameters: {method: task_arithmetic, weight: [1.0, 0.0], lambda: 1.0}\n"
    )
    out = tensors(build_text(models, tmp_path / "ta", text).out_dir)
    code = raw_tensors(models / "code")
    for k, t in code.items():
        torch.testing.assert_close(out[k], t, rtol=0, atol=1e-6, msg=k)


def test_bfloat16_output(models: Path, tmp_path: Path) -> None:
    text = (
        "method: merge\nbase: base\nexperts: [code, legal]\nparameters: {method: linear}\n"
        "output: {dtype: bfloat16}\n"
    )
    res = build_text(models, tmp_path / "bf16", text)
    out = tensors(res.out_dir)
    assert {t.dtype for t in out.values()} == {torch.bfloat16}
    import json

    assert json.loads((res.out_dir / "config.json").read_text())["dtype"] == "bfloat16"


def test_unnormalised_linear_sums_shared_tensors(models: Path, tmp_path: Path) -> None:
    # Shared (expert == base) tensors are copied from the base only where every method gives the
    # base back; an unnormalised linear sum of two copies is twice the base.
    text = (
        "method: merge\nbase: base\nexperts: [code, legal]\n"
        "parameters: {method: linear, normalize: false}\n"
    )
    out = tensors(build_text(models, tmp_path / "sum", text).out_dir)
    base = raw_tensors(models / "base")
    k = "model.embed_tokens.weight"
    assert torch.equal(out[k], 2 * base[k])
