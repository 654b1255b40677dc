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
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from build_helpers import BEACON_DIM, CAL_TEXT, beacon_row, make_beacon, write_expert_file
from safetensors.torch import load_file, save_file

from composer.tiny_models import make_tiny_llama, make_tiny_olmo2, perturb_ffn

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
