"""The shipped upcycle / compose example specs build, registry names mapped to tiny checkpoints;
the upcycled ones compute exactly the dense model."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Literal

import pytest
import torch
from build_helpers import config, load_model, logits, token_ids

from composer.build import build
from composer.inputs import LocalPathResolver, ResolvedInput
from composer.spec_load import load_spec

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
IDS = token_ids()


class MappedResolver:
    """Registry-style references -> local folders, with an owner and consent as the registry
    gives them."""

    def __init__(self, folders: dict[str, Path]):
        self.folders = folders
        self.local = LocalPathResolver()

    def resolve(self, ref: str, *, role: Literal["base", "expert"]) -> ResolvedInput:
        r = self.local.resolve(str(self.folders[ref]), role=role)
        return dataclasses.replace(r, ref=ref, name=ref, owner=f"{ref}-owner", policy="opt_in")


@pytest.fixture(scope="module")
def resolver(models: Path) -> MappedResolver:
    return MappedResolver(
        {
            "smollm2": models / "base",
            "code": models / "code",
            "legal": models / "legal",
            "manuals": models / "code",  # one more anchored expert (same weights, own name)
            "smollm2-code-ft": models / "ft1",
            "smollm2-legal-ft": models / "ft2",
            "./checkpoints/smollm2-manuals-ft": models / "base",
        }
    )


@pytest.mark.parametrize("name", ["upcycle", "upcycle_hidden_mean"])
def test_upcycle_examples_are_exact(
    models: Path, tmp_path: Path, resolver: MappedResolver, name: str
) -> None:
    spec = load_spec(EXAMPLES / f"{name}.yaml")
    res = build(spec, tmp_path / name, resolver, progress=False)
    cfg = config(res.out_dir)
    assert cfg["num_local_experts"] == spec.num_experts
    assert cfg["composer_experts"] == (spec.expert_names or [f"expert{i}" for i in range(8)])
    if name == "upcycle":  # moe_layers {every: 2, offset: 1} on a 2-layer base
        assert cfg["composer_dense_layers"] == [0]
    torch.testing.assert_close(
        logits(res.out_dir, IDS), logits(models / "base", IDS), rtol=0, atol=1e-5
    )


def test_flexmix_example(
    tmp_path: Path, resolver: MappedResolver, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The owners' proxy samples where `make demo` writes them; the tiny base has no tokenizer.
    monkeypatch.setenv("COMPOSER_HOME", str(tmp_path))
    for i, name in enumerate(("code", "legal", "manuals")):
        (tmp_path / "proxy" / name).mkdir(parents=True)
        (tmp_path / "proxy" / name / "sample.txt").write_text(f"{name} sample {i}\n" * 40)
    spec = load_spec(EXAMPLES / "flexmix.yaml")
    assert spec.router.tune is not None
    spec.router.tune = spec.router.tune.model_copy(
        update={"tokenizer": "bytes", "steps": 2, "seq_len": 32, "max_chunks": 4, "bf16": False}
    )
    res = build(spec, tmp_path / "flexmix", resolver, progress=False)
    cfg = config(res.out_dir)
    assert cfg["composer_experts"] == ["public", "code", "legal", "manuals"]
    assert cfg["composer_router_file"] == "composer_router.safetensors"
    man = json.loads((res.out_dir / "composition.json").read_text())
    assert man["name"] == "flexmix" and man["base"]["owner"] == "smollm2-owner"
    assert [e["owner"] for e in man["experts"]] == [
        "smollm2-owner",
        "code-owner",
        "legal-owner",
        "manuals-owner",
    ]
    tuning = man["router_tuning"]
    assert {k: v["sequences"] for k, v in tuning["proxy"].items()} == {
        "code": 4,
        "legal": 4,
        "manuals": 4,
    }
    assert all(e["policy"] == "opt_in" for e in man["experts"])
    load_model(res.out_dir)


def test_btx_example(tmp_path: Path, resolver: MappedResolver) -> None:
    spec = load_spec(EXAMPLES / "btx.yaml")
    res = build(spec, tmp_path / "btx", resolver, progress=False)
    cfg = config(res.out_dir)
    assert cfg["composer_experts"] == ["code", "legal", "manuals"]
    assert cfg["num_local_experts"] == 3 and cfg["num_experts_per_tok"] == 2
    load_model(res.out_dir)


@pytest.fixture(scope="module")
def lora_resolver(loras: Path, resolver: MappedResolver) -> MappedResolver:
    return MappedResolver(
        {
            **resolver.folders,
            "code-lora": loras / "lcode",
            "legal-lora": loras / "llegal",
            "manuals-lora": loras / "lcode",  # one more FFN adapter (same factors, own name)
        }
    )


def test_lora_examples(tmp_path: Path, lora_resolver: MappedResolver) -> None:
    """lora_materialised mixes a full and LoRA experts into a Mixtral; lora_shared computes what
    the same spec materialised computes."""
    import models  # noqa: F401  (registers ComposerLoraMoeForCausalLM)
    from router_train.biased_router import load_composed

    spec = load_spec(EXAMPLES / "lora_materialised.yaml")
    res = build(spec, tmp_path / "mat", lora_resolver, progress=False)
    cfg = config(res.out_dir)
    assert cfg["architectures"] == ["MixtralForCausalLM"]
    assert cfg["composer_experts"] == ["public", "code", "legal-lora", "manuals-lora"]
    man = json.loads((res.out_dir / "composition.json").read_text())
    assert [e["kind"] for e in man["experts"]][2:] == ["lora", "lora"]
    load_model(res.out_dir)

    spec = load_spec(EXAMPLES / "lora_shared.yaml")
    shared = build(spec, tmp_path / "shared", lora_resolver, progress=False).out_dir
    assert config(shared)["architectures"] == ["ComposerLoraMoeForCausalLM"]
    twin = spec.model_copy(update={"lora": "materialised", "name": "twin"})
    mat = build(twin, tmp_path / "twin", lora_resolver, progress=False).out_dir
    with torch.no_grad():
        want = load_composed(mat)(IDS).logits
        got = load_model(shared)(IDS).logits
    torch.testing.assert_close(got, want, rtol=0, atol=2e-5)
