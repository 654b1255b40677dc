"""`method: merge` with LoRA experts: dense output == the same merge of the full checkpoints
that apply_lora makes (byte for byte, streamed too); ``output.format: lora`` writes an adapter
PEFT loads, with the tensors of merge.lora_combine; bad inputs are refused before any write."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from composer.errors import PlanError
from composer.merging import streaming
from composer.spec import SpecError
from composer.tiny_models import make_tiny_lora
from merge.lora import apply_lora, lora_factors
from merge.lora_combine import combine, output_rank
from merge.task_vectors import tensor_generator
from tests.mergebuild.mergebuild_helpers import build_text, tensors


def _factors(folder: Path) -> dict:
    config = json.loads((folder / "adapter_config.json").read_text())
    return lora_factors(load_file(folder / "adapter_model.safetensors"), config)


def _merge(experts: list[str], params: str, output: str = "") -> str:
    refs = "\n".join(f"  - {e}" for e in experts)
    return f"method: merge\nbase: base\nexperts:\n{refs}\nparameters: {params}\n{output}"


DENSE = [
    "{method: task_arithmetic, weight: [0.7, 1.2], lambda: 0.9}",
    "{method: ties, density: 0.4}",
    "{method: dare_ties, density: 0.6, seed: 3}",
    "{method: linear}",
    "{method: expert_merging, steps: 2, seq_len: 32, calibration: [cal/code.txt, cal/legal.txt]}",
]


@pytest.mark.parametrize("params", DENSE, ids=lambda p: p.split(",")[0][9:].rstrip("}"))
def test_dense_merge_of_loras_equals_merge_of_applied_checkpoints(loras, tmp_path, params):
    ours = build_text(loras, tmp_path / "lora", _merge(["lora_a", "lora_b"], params))
    ref = build_text(loras, tmp_path / "full", _merge(["lora_a_full", "lora_b_full"], params))
    shard = "model.safetensors"
    assert ours.files[shard] == ref.files[shard]  # the same bytes
    man = json.loads((ours.out_dir / "composition.json").read_text())
    assert [e["kind"] for e in man["experts"]] == ["lora", "lora"]


def test_streamed_blocks_and_mixed_experts(loras, tmp_path, monkeypatch):
    """Row blocks and positioned reads (tiny budgets) give the whole-tensor bytes; a LoRA
    expert merges beside a full one."""
    params = "{method: dare_linear, density: 0.5, weight: [1.0, 0.5]}"
    whole = build_text(loras, tmp_path / "whole", _merge(["code", "lora_b"], params))
    monkeypatch.setattr(streaming, "BLOCK_ENTRIES", 1 << 12)
    monkeypatch.setattr(streaming, "WHOLE_READ_BYTES", 1 << 12)
    streamed = build_text(loras, tmp_path / "streamed", _merge(["code", "lora_b"], params))
    ref = build_text(loras, tmp_path / "ref", _merge(["code", "lora_b_full"], params))
    assert whole.files == streamed.files
    assert whole.files["model.safetensors"] == ref.files["model.safetensors"]
    merged, base = tensors(whole.out_dir), load_file(loras / "base" / "model.safetensors")
    # a weight neither expert touches is the base's, bit for bit
    assert torch.equal(merged["model.layers.0.self_attn.k_proj.weight"],
                       base["model.layers.0.self_attn.k_proj.weight"])  # fmt: skip


def _peft_state(base: Path, adapter: Path) -> dict[str, torch.Tensor]:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    peft = PeftModel.from_pretrained(model, adapter)
    return {k: v.detach() for k, v in peft.merge_and_unload().state_dict().items()}


@pytest.mark.parametrize(
    ("experts", "params"),
    [
        (["lora_a", "lora_c"], "{combination: cat, weight: [0.5, 1.5]}"),
        (["lora_a", "lora_b"], "{combination: dare_ties, density: 0.7, seed: 5}"),
        (["lora_a", "lora_b", "lora_c"], "{combination: ties_svd, density: 0.5, rank: 3}"),
    ],
    ids=["cat", "dare_ties", "ties_svd"],
)
def test_lora_output_is_a_peft_adapter_with_our_tensors(loras, tmp_path, experts, params):
    res = build_text(loras, tmp_path / "out", _merge(experts, params, "output: {format: lora}"))
    out = res.out_dir
    assert sorted(res.files) == ["adapter_config.json", "adapter_model.safetensors"]
    assert not (out / "config.json").exists()
    got = load_file(out / "adapter_model.safetensors")
    spec = json.loads((out / "composition.json").read_text())["parameters"]
    ins = [_factors(loras / e) for e in experts]
    rank = output_rank(spec["combination"], [max(f.rank for f in x.values()) for x in ins],
                       spec.get("rank"))  # fmt: skip
    names = sorted(set().union(*ins))
    weights = spec["weight"] or [1.0] * len(experts)
    for w in names:
        gen = tensor_generator(spec["seed"], w)
        a, b = combine([x.get(w) for x in ins], weights, spec["combination"], rank,
                       density=spec["density"], generator=gen)  # fmt: skip
        module = "base_model.model." + w.removesuffix(".weight")
        assert torch.equal(got[f"{module}.lora_A.weight"], a)
        assert torch.equal(got[f"{module}.lora_B.weight"], b)
    # PEFT loads it onto the base and merges it exactly as merge.lora reads it
    base_sd = load_file(loras / "base" / "model.safetensors")
    ours = apply_lora(base_sd, _factors(out))
    theirs = _peft_state(loras / "base", out)
    for k in base_sd:
        torch.testing.assert_close(theirs[k], ours[k], rtol=0, atol=1e-6, msg=k)
    if spec["combination"] == "cat":  # exact: base + sum_i w_i delta_i, the dense result
        text = _merge(experts, "{method: task_arithmetic, weight: [0.5, 1.5]}")
        ref = build_text(loras, tmp_path / "dense", text)
        dense = tensors(ref.out_dir)
        for k in base_sd:
            torch.testing.assert_close(ours[k], dense[k], rtol=1e-5, atol=1e-6, msg=k)


@pytest.mark.parametrize(
    ("experts", "params", "output", "error", "message"),
    [
        (["lora_a", "code"], "{combination: cat}", "output: {format: lora}", PlanError,
         r"experts\[1\].*kind 'dense'.*LoRA adapters only"),
        (["lora_a", "lora_c"], "{combination: linear}", "output: {format: lora}", PlanError,
         r"parameters.combination: combination 'linear' needs adapters of one rank"),
        (["lora_a"], "{method: ties, density: 0.5}", "output: {format: lora}", SpecError,
         r"parameters.method: output.format lora takes 'combination'"),
        (["lora_a"], "{combination: cat, lambda: 2}", "output: {format: lora}", SpecError,
         r"parameters.lambda: unknown parameter"),
        (["lora_a", "lora_b"], "{method: ties, density: 0.5}", "output: {format: adapter}",
         SpecError, r"output.format"),
        (["lora_wide"], "{method: task_arithmetic}", "", PlanError,
         r"experts\[0\].*does not fit the base"),
    ],
    ids=["full-expert", "unequal-ranks", "method", "unknown-key", "bad-format", "wrong-base"],
)  # fmt: skip
def test_refused_before_any_write(loras, tmp_path, experts, params, output, error, message):
    if "lora_wide" in experts and not (loras / "lora_wide").is_dir():
        make_tiny_lora(loras / "wide", loras / "lora_wide", seed=14, targets=("up_proj",))
    with pytest.raises(error, match=message):
        build_text(loras, tmp_path / "out", _merge(experts, params, output))
    assert not (tmp_path / "out").exists()
    assert not list(tmp_path.glob(".out*"))


def test_registered_lora_experts(loras, tmp_path):
    """`--kind lora` experts from the registry merge like the same folders on disk, both into a
    model and into an adapter; an owner's opt-out refuses the build."""
    from composer.build import build
    from composer.errors import OptedOutError
    from composer.registry_resolver import RegistryResolver
    from composer.spec_load import load_spec
    from registry import db
    from registry.service import RegistryService

    url = f"sqlite:///{tmp_path / 'registry.db'}"
    db.upgrade(url)
    service = RegistryService(url, tmp_path / "home")
    try:
        service.add_base(loras / "base", name="tiny")
        service.add_owner("acme")
        for name in ("lora_a", "lora_b"):
            service.add_expert(loras / name, name=name.replace("_", "-"), owner="acme",
                               base="tiny", domain=name[-1], kind="lora")  # fmt: skip
        resolver = RegistryResolver(service)
        for i, params in enumerate(["{method: ties, density: 0.5}", "{combination: cat}"]):
            output = "" if "method" in params else "output: {format: lora}"
            text = _merge(["lora-a", "lora-b"], params, output).replace("base: base", "base: tiny")
            (tmp_path / f"s{i}.yaml").write_text(text)
            res = build(load_spec(tmp_path / f"s{i}.yaml"), tmp_path / f"reg{i}", resolver,
                        progress=False)  # fmt: skip
            local = build_text(loras, tmp_path / f"local{i}", _merge(["lora_a", "lora_b"],
                               params, output))  # fmt: skip
            assert res.files == local.files
        service.set_policy("lora-b", owner="acme", policy="opt_out")
        with pytest.raises(OptedOutError, match="lora-b"):
            build(load_spec(tmp_path / "s1.yaml"), tmp_path / "out", resolver, progress=False)
        assert not (tmp_path / "out").exists()
    finally:
        service.close()
