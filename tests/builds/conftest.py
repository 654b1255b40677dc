"""Tiny checkpoints for the upcycle / compose build tests (written once per session).

Folders under the session root (refs in the specs are relative to it, see build_helpers):

- base, code, legal: a random Llama and two FlexOlmo-style experts (FFN perturbed, every other
  weight bit-identical) carrying composer_expert.safetensors (domain embedding, router row, bias)
- plain: an anchored expert without composer_expert.safetensors
- ft1, ft2: full "fine-tunes" (every weight differs) of the base's shape, for BTX
- olmo, olmo_code, olmo_legal: the same for an OLMo-2 base (-> FlexOlmoForCausalLM)
- beacon, beacon_expert: a Llama whose residual stream has one constant dimension (see
  make_beacon), so a router row on that dimension picks one expert for every token
- tied: a Llama with tied embeddings
- cal/: short calibration texts (one sequence each)
- lcode, llegal, lattn (fixture `loras`): PEFT LoRA adapters of base with expert files, each
  with a *_full twin (the full checkpoint it stands for)
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from build_helpers import BEACON_DIM, CAL_TEXT, beacon_row, make_beacon, write_expert_file
from safetensors.torch import load_file, save_file

from composer.tiny_models import make_tiny_llama, make_tiny_lora, make_tiny_olmo2, perturb_ffn
from merge.lora import apply_lora, lora_factors

# Tiny models run fastest on one thread, and the machine's 2 cores are shared.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("buildmodels")
    make_tiny_llama(root / "base", seed=0)
    for i, name in enumerate(("code", "legal"), start=1):
        perturb_ffn(root / "base", root / name, seed=i, scale=0.05)
        write_expert_file(root / name, layers=[0, 1], seed=10 + i, bias=-0.5 * i)
    perturb_ffn(root / "base", root / "plain", seed=3, scale=0.05)
    make_tiny_llama(root / "ft1", seed=1)
    make_tiny_llama(root / "ft2", seed=2)

    make_tiny_olmo2(root / "olmo", seed=0, eos_token_id=2)  # the default id is outside vocab
    for i, name in enumerate(("olmo_code", "olmo_legal"), start=1):
        perturb_ffn(root / "olmo", root / name, seed=i, scale=0.05)
        write_expert_file(root / name, layers=[0, 1], seed=20 + i, bias=-1.0)

    make_tiny_llama(root / "beacon", seed=5)
    make_beacon(root / "beacon")
    perturb_ffn(root / "beacon", root / "beacon_expert", seed=6, scale=0.05)
    # Keep the beacon dimension constant in the expert too: its FFN must not write to it.
    sd = load_file(root / "beacon_expert" / "model.safetensors")
    for k in sd:
        if k.endswith("mlp.down_proj.weight"):
            sd[k][BEACON_DIM, :] = 0.0
    save_file(sd, root / "beacon_expert" / "model.safetensors", metadata={"format": "pt"})
    # init domain_embedding picks the expert on every token, init trained (router_row) the
    # public model.
    write_expert_file(
        root / "beacon_expert",
        layers=[0, 1],
        seed=7,
        bias=-1.0,
        domain=beacon_row(4.0),
        row=beacon_row(-4.0),
    )

    make_tiny_llama(root / "tied", seed=8, tie_word_embeddings=True)

    cal = root / "cal"
    cal.mkdir()
    for name, text in CAL_TEXT.items():
        (cal / f"{name}.txt").write_text(text)
    return root


def _full_twin(base: Path, adapter: Path, out: Path) -> Path:
    """The full checkpoint an adapter stands for (apply_lora, checked equal to PEFT elsewhere),
    with the adapter's composer_expert.safetensors."""
    out.mkdir()
    config = json.loads((adapter / "adapter_config.json").read_text())
    factors = lora_factors(load_file(adapter / "adapter_model.safetensors"), config)
    sd = apply_lora(load_file(base / "model.safetensors"), factors)
    save_file(sd, out / "model.safetensors", metadata={"format": "pt"})
    shutil.copy(base / "config.json", out / "config.json")
    if (adapter / "composer_expert.safetensors").is_file():
        shutil.copy(adapter / "composer_expert.safetensors", out)
    return out


@pytest.fixture(scope="session")
def loras(models: Path) -> Path:
    """LoRA experts beside the session's tiny models (refs in specs are relative to `models`):
    lcode (all FFN projections, rank 4), llegal (up/down, rank 8, rsLoRA), lattn (q_proj and
    up_proj), each with a *_full twin."""
    base = models / "base"
    make_tiny_lora(base, models / "lcode", seed=31, rank=4)
    make_tiny_lora(
        base, models / "llegal", seed=32, rank=8, targets=("up_proj", "down_proj"), use_rslora=True
    )
    make_tiny_lora(base, models / "lattn", seed=33, rank=4, targets=("q_proj", "up_proj"))
    for i, name in enumerate(("lcode", "llegal", "lattn")):
        write_expert_file(models / name, layers=[0, 1], seed=40 + i, bias=-0.3 * (i + 1))
        _full_twin(base, models / name, models / f"{name}_full")
    return models
