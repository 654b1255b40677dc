"""Helpers of the build tests: tiny-model surgery, spec files, reading outputs, running models."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from composer.build import BuildResult, build
from composer.inputs import LocalPathResolver
from composer.spec_load import load_spec

HIDDEN = 128  # composer.tiny_models.TINY_DIMS
VOCAB = 256
BEACON_DIM = 7  # the residual-stream dimension make_beacon holds constant
PROJ_NAMES = {"gate": "w1", "up": "w3", "down": "w2"}  # Mixtral expert tensor names

# Each text is shorter than one calibration sequence (256 tokens), so its FFN inputs are one
# forward pass over its UTF-8 bytes (the tiny models have no tokenizer; vocab 256).
CAL_TEXT = {
    "code": "def add(a, b):\n    return a + b\n\nclass Stack:\n    def push(self, x): ...\n",
    "legal": "Permission is hereby granted, free of charge, to any person obtaining a copy\n",
    "manuals": ".TH LS 1\n.SH NAME\nls \\- list directory contents\n.SH SYNOPSIS\n",
}


def write_expert_file(
    folder: Path,
    layers: list[int],
    seed: int,
    bias: float,
    domain: torch.Tensor | None = None,
    row: torch.Tensor | None = None,
) -> Path:
    """composer_expert.safetensors as `composer expert train` writes it (docs/spec.md).

    Per layer i: domain_embedding and router_row [hidden] (random unless given), router_bias []
    (``bias - 0.25 * i``, so layers differ).
    """
    gen = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    for i in layers:
        d = domain if domain is not None else torch.randn(HIDDEN, generator=gen)
        r = row if row is not None else torch.randn(HIDDEN, generator=gen)
        tensors[f"model.layers.{i}.domain_embedding"] = d.float().clone()
        tensors[f"model.layers.{i}.router_row"] = r.float().clone()
        tensors[f"model.layers.{i}.router_bias"] = torch.tensor(bias - 0.25 * i)
    meta = {
        "composer_format": "flexolmo-expert/1",
        "domain": folder.name,
        "layers": ",".join(map(str, layers)),
    }
    path = folder / "composer_expert.safetensors"
    save_file(tensors, path, metadata=meta)
    return path


def make_beacon(folder: Path) -> None:
    """Give a tiny Llama a residual-stream dimension that is 1.0 for every token and layer.

    The embedding is 1.0 in column BEACON_DIM and neither attention (o_proj) nor the FFN
    (down_proj) writes to that row, so every FFN input (RMSNorm of the residual, norm weights 1)
    is strictly positive there. A router row c * e_BEACON_DIM then gives logit > 0 for c > 0 and
    < 0 for c < 0 on every token, while a zero row gives 0: top-1 routing is known in advance.
    """
    path = folder / "model.safetensors"
    sd = load_file(path)
    sd["model.embed_tokens.weight"][:, BEACON_DIM] = 1.0
    for k in sd:
        if k.endswith(("self_attn.o_proj.weight", "mlp.down_proj.weight")):
            sd[k][BEACON_DIM, :] = 0.0
    for k in sd:
        if k.endswith("layernorm.weight"):
            assert torch.all(sd[k] == 1.0), k  # the argument above needs unit norm weights
    save_file(sd, path, metadata={"format": "pt"})


def beacon_row(scale: float) -> torch.Tensor:
    row = torch.zeros(HIDDEN)
    row[BEACON_DIM] = scale
    return row


def write_spec(folder: Path, text: str, name: str = "spec.yaml") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(text)
    return path


def build_text(
    models: Path, out: Path, text: str, *, seed: int | None = None, spec_dir: Path | None = None
) -> BuildResult:
    """Write ``text`` as a spec (beside ``out`` unless ``spec_dir``) and build it; refs in the
    spec are folders relative to ``models``."""
    spec_path = write_spec(spec_dir or out.parent, text, f"spec-{out.name}.yaml")
    spec = load_spec(spec_path)
    return build(spec, out, LocalPathResolver(models), seed=seed, progress=False)


def leftovers(parent: Path) -> list[str]:
    """Everything in ``parent`` except the spec files build_text writes there."""
    return sorted(p.name for p in parent.iterdir() if not p.name.startswith("spec-"))


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    """Every weight of an output folder, through its index (the only files loaders read)."""
    index = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
    out: dict[str, torch.Tensor] = {}
    for fname in sorted(set(index.values())):
        with safe_open(str(folder / fname), "pt") as f:
            for k in f.keys():  # noqa: SIM118
                out[k] = f.get_tensor(k)
    assert out.keys() == index.keys()
    return out


def raw_tensors(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of an input folder's model safetensors (no index)."""
    out: dict[str, torch.Tensor] = {}
    for p in sorted(folder.glob("model*.safetensors")):
        with safe_open(str(p), "pt") as f:
            for k in f.keys():  # noqa: SIM118
                out[k] = f.get_tensor(k)
    return out


def config(folder: Path) -> dict:
    return json.loads((folder / "config.json").read_text())


def bit_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same dtype, shape and bytes."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return torch.equal(a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8))


def load_model(folder: Path) -> torch.nn.Module:
    """Plain transformers, float32; fails on any missing or unexpected weight."""
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(
        folder, dtype=torch.float32, output_loading_info=True
    )
    bad = {k: v for k, v in info.items() if v and k != "error_msgs"} | (
        {"error_msgs": info["error_msgs"]} if info.get("error_msgs") else {}
    )
    assert not bad, f"{folder}: {bad}"
    return model.eval()


@torch.no_grad()
def logits(folder: Path, ids: torch.Tensor) -> torch.Tensor:
    return load_model(folder)(ids).logits


def token_ids(n: int = 2, length: int = 16) -> torch.Tensor:
    return torch.randint(0, VOCAB, (n, length), generator=torch.Generator().manual_seed(0))


@torch.no_grad()
def ffn_inputs(folder: Path, text: str) -> list[torch.Tensor]:
    """Per layer, the FFN input of a dense Llama on ``text`` as UTF-8 bytes ([tokens, hidden]).

    Measured at the output of post_attention_layernorm (composer.calibration hooks the MLP's
    input instead), from one forward pass: the text must be under 256 bytes.
    """
    model = load_model(folder)
    ids = list(text.encode())
    assert len(ids) <= 256 and max(ids) < VOCAB
    got: dict[int, torch.Tensor] = {}
    hooks = [
        layer.post_attention_layernorm.register_forward_hook(
            lambda _m, _a, out, i=i: got.__setitem__(i, out.reshape(-1, out.shape[-1]).float())
        )
        for i, layer in enumerate(model.model.layers)
    ]
    try:
        model(torch.tensor([ids]))
    finally:
        for h in hooks:
            h.remove()
    return [got[i] for i in range(len(model.model.layers))]
