"""Every merge method builds from a spec file, loads in transformers and records its inputs."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from mergebuild_helpers import build_text, logits, tensors, token_ids

PARAMS = {
    "linear": "{method: linear}",
    "task_arithmetic": "{method: task_arithmetic, lambda: 0.7}",
    "ties": "{method: ties, density: 0.5, lambda: 1.0}",
    "dare_linear": "{method: dare_linear, density: 0.5}",
    "dare_ties": "{method: dare_ties, density: [0.5, 0.7]}",
    "expert_merging": "{method: expert_merging, steps: 2, seq_len: 32, "
    "calibration: [[cal/code.txt], [cal/legal.txt]]}",
    "expert_merging++": "{method: expert_merging++, steps: 2, steps_stage2: 2, chunks: 2, "
    "seq_len: 32, calibration: [cal/code.txt, cal/legal.txt]}",
}


@pytest.mark.parametrize("method", sorted(PARAMS))
def test_method_builds_and_loads(models: Path, tmp_path: Path, method: str) -> None:
    text = f"method: merge\nbase: base\nexperts: [code, legal]\nparameters: {PARAMS[method]}\n"
    res = build_text(models, tmp_path / "out", text)
    out = res.out_dir
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"]
    y = logits(out, token_ids())
    assert y.shape == (2, 12, 256) and torch.isfinite(y).all()
    # The merge moved the FFN away from the base but left shared weights alone (experts only
    # differ from the base in their FFN).
    merged, base = tensors(out), tensors_of(models / "base")
    ffn = "model.layers.0.mlp.up_proj.weight"
    assert not torch.equal(merged[ffn], base[ffn])
    assert torch.equal(merged["model.embed_tokens.weight"], base["model.embed_tokens.weight"])
    man = json.loads((out / "composition.json").read_text())
    assert man["method"] == f"merge/{method}"
    assert [e["name"] for e in man["experts"]] == ["code", "legal"]
    assert all(len(e["sha256"]) == 64 for e in man["experts"])
    assert man["parameters"]["method"] == method
    assert set(res.files) >= {"model.safetensors", "model.safetensors.index.json"}
    if method.startswith("expert_merging"):
        assert man["results"]["steps"] >= 2


def tensors_of(folder: Path) -> dict[str, torch.Tensor]:
    from mergebuild_helpers import raw_tensors

    return raw_tensors(folder)


def test_plan_is_readable(models: Path) -> None:
    from mergebuild_helpers import write_spec

    from composer.inputs import LocalPathResolver
    from composer.merging.plan import plan_merge
    from composer.spec_load import load_spec

    path = write_spec(
        models, "method: merge\nbase: base\nexperts: [code, legal]\n"
        "parameters: {method: ties, density: 0.3}\n", "plan.yaml",
    )  # fmt: skip
    text = str(plan_merge(load_spec(path), LocalPathResolver(models, hash_inputs=False)))
    assert "merge/ties" in text and "density" in text and "code" in text and "steps:" in text


@pytest.mark.parametrize(("native", "setting"), [(True, None), (False, None), (False, "true")])
def test_expert_merging_precision(
    models: Path,
    tmp_path: Path,
    pretend: Callable[[bool], None],
    autocast_seen: set[Any],
    native: bool,
    setting: str | None,
) -> None:
    """parameters.bf16 is auto by default (bf16 autocast only where native); true forces it."""
    pretend(native)
    bf16 = f", bf16: {setting}" if setting else ""
    params = PARAMS["expert_merging"].replace("}", bf16 + "}")
    text = f"method: merge\nbase: base\nexperts: [code, legal]\nparameters: {params}\n"
    res = build_text(models, tmp_path / "out", text)
    want = native or setting == "true"
    man = json.loads((res.out_dir / "composition.json").read_text())
    assert man["results"]["compute_dtype"] == ("bfloat16" if want else "float32")
    assert (torch.bfloat16 if want else None) in autocast_seen
