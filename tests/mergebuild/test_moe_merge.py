"""moe_merge: a tiny 4-expert Mixtral merged to 2 experts loads and runs in transformers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from mergebuild_helpers import build_text, logits, tensors, token_ids


@pytest.mark.parametrize(
    "params",
    [
        "{method: m_smoe, num_experts: 2, calibration: [cal/code.txt, cal/legal.txt], seq_len: 32}",
        "{method: uniform, num_experts: 2}",
        "{method: m_smoe, num_experts: 2, calibration: cal/code.txt, compress: low_rank, rank: 8}",
    ],
    ids=["m_smoe", "uniform", "m_smoe_low_rank"],
)
def test_moe_merge_4_to_2(models: Path, tmp_path: Path, params: str) -> None:
    res = build_text(
        models, tmp_path / "moe2", f"method: moe_merge\nbase: moe\nparameters: {params}\n"
    )
    cfg = json.loads((res.out_dir / "config.json").read_text())
    assert cfg["architectures"] == ["MixtralForCausalLM"]
    assert cfg["num_local_experts"] == 2 and len(cfg["composer_experts"]) == 2
    out = tensors(res.out_dir)
    assert out["model.layers.0.block_sparse_moe.gate.weight"].shape == (2, 128)
    assert "model.layers.1.block_sparse_moe.experts.1.w2.weight" in out
    assert not any(".experts.2." in k for k in out)
    y = logits(res.out_dir, token_ids())
    assert y.shape == (2, 12, 256) and torch.isfinite(y).all()
    man = json.loads((res.out_dir / "composition.json").read_text())
    assert man["method"].startswith("moe_merge/")
    groups = man["results"]["groups"]
    for layer_groups in groups.values():  # every input expert lands in exactly one output expert
        assert sorted(e for g in layer_groups for e in g) == [0, 1, 2, 3]


def test_uniform_merge_averages_contiguous_pairs(models: Path, tmp_path: Path) -> None:
    res = build_text(models, tmp_path / "u", "method: moe_merge\nbase: moe\n"
                     "parameters: {method: uniform, num_experts: 2}\n")  # fmt: skip
    out = tensors(res.out_dir)
    from safetensors.torch import load_file

    src = load_file(models / "moe" / "model.safetensors")
    ex = "model.layers.1.block_sparse_moe.experts"
    want = (src[f"{ex}.2.w1.weight"] + src[f"{ex}.3.w1.weight"]) / 2
    torch.testing.assert_close(out[f"{ex}.1.w1.weight"], want, rtol=0, atol=1e-7)
    cfg = json.loads((res.out_dir / "config.json").read_text())
    assert cfg["composer_experts"] == ["expert0+expert1", "expert2+expert3"]
