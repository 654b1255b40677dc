"""The shipped merge / moe_merge example specs build, registry names mapped to tiny checkpoints."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Literal

import pytest

from composer.build import build
from composer.inputs import LocalPathResolver, ResolvedInput
from composer.spec_load import load_spec

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


class MappedResolver:
    """Registry-style names -> local folders, with an owner and consent as the registry gives."""

    def __init__(self, folders: dict[str, Path]):
        self.folders = folders
        self.local = LocalPathResolver(hash_inputs=False)

    def resolve(self, ref: str, *, role: Literal["base", "expert"]) -> ResolvedInput:
        r = self.local.resolve(str(self.folders[ref]), role=role)
        return dataclasses.replace(r, ref=ref, name=ref, owner=f"{ref}-owner", policy="opt_in")


@pytest.mark.parametrize("path", sorted(EXAMPLES.glob("*merge_*.yaml")), ids=lambda p: p.stem)
def test_example_builds(
    models: Path, tmp_path: Path, path: Path, request: pytest.FixtureRequest
) -> None:
    # the adapters only for the LoRA examples (making them imports PEFT)
    loras = request.getfixturevalue("loras") if "lora" in path.stem else models
    resolver = MappedResolver(
        {
            "smollm2": models / "base",
            "code": models / "code",
            "legal": models / "legal",
            "manuals": models / "code",
            "smollm2-upcycled-8x": models / "moe8",
            "code-lora": loras / "lora_a",
            "legal-lora": loras / "lora_b",
            "manuals-lora": loras / "lora_a",
        }
    )
    spec = load_spec(path)
    res = build(spec, tmp_path / path.stem, resolver, progress=False)
    man = json.loads((res.out_dir / "composition.json").read_text())
    assert man["base"]["owner"] == f"{spec.base}-owner"
    if spec.output.format == "lora":  # a merged PEFT adapter, no model config
        combination = spec.parameters["combination"]  # type: ignore[index]
        assert man["method"] == f"merge/lora/{combination}"
        cfg = json.loads((res.out_dir / "adapter_config.json").read_text())
        assert cfg["r"] == cfg["lora_alpha"] == man["results"]["rank"]
        assert not (res.out_dir / "config.json").exists()
        return
    assert man["method"] == f"{spec.method}/{spec.parameters['method']}"  # type: ignore[index]
    cfg = json.loads((res.out_dir / "config.json").read_text())
    if spec.method == "moe_merge":
        assert cfg["num_local_experts"] == 4
    else:
        assert cfg["architectures"] == ["LlamaForCausalLM"]
