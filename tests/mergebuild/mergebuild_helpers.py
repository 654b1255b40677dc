"""Helpers of the merge-build tests: write a spec file, build it, read the result."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

from composer.build import BuildResult, build
from composer.inputs import LocalPathResolver
from composer.spec_load import load_spec


def write_spec(models: Path, text: str, name: str = "spec.yaml") -> Path:
    path = models / name
    path.write_text(text)
    return path


def build_text(models: Path, out: Path, text: str, **kw: object) -> BuildResult:
    """Write ``text`` as a spec beside the models and build it with local paths."""
    spec = load_spec(write_spec(models, text, f"spec-{out.name}.yaml"))
    return build(spec, out, LocalPathResolver(models), progress=False, **kw)  # type: ignore[arg-type]


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    """Every weight of a checkpoint folder, through its index."""
    index = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
    out = {}
    for fname in sorted(set(index.values())):
        with safe_open(str(folder / fname), "pt") as f:
            for k in f.keys():  # noqa: SIM118
                out[k] = f.get_tensor(k)
    return out


def raw_tensors(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the safetensors files of an input folder (no index)."""
    out = {}
    for p in sorted(folder.glob("model*.safetensors")):
        with safe_open(str(p), "pt") as f:
            for k in f.keys():  # noqa: SIM118
                out[k] = f.get_tensor(k)
    return out


@torch.no_grad()
def logits(model_dir: Path, ids: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    return model(ids).logits


def token_ids(n: int = 2, length: int = 12, vocab: int = 256) -> torch.Tensor:
    return torch.randint(0, vocab, (n, length), generator=torch.Generator().manual_seed(0))
