"""LoRA experts at registration: real PEFT adapters, the variants refused (by the registry and by
merge/lora.py alike), the extras and base checks, and what the registry records about targets."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from composer.tiny_models import make_tiny_lora
from merge.errors import MergeError
from merge.lora import lora_factors
from registry.checkpoint import ADAPTER_CONFIG, ADAPTER_WEIGHTS, EXPERT_FILE, inspect_folder
from registry.compat import BASE_FINGERPRINT_KEY, check_fits_base
from registry.errors import CheckpointError
from registry.lora import lora_summary, lora_targets_only_ffn

# name -> (make_tiny_lora keyword arguments, the field the refusal must name)
REFUSED = {
    "dora": ({"use_dora": True}, "use_dora"),
    "lora_bias": ({"lora_bias": True}, "lora_bias"),
    "embedding": ({"targets": ("embed_tokens",)}, r"embed_tokens\..*is not a lora_A / lora_B"),
    "modules_to_save": ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
}


@pytest.fixture(scope="module")
def adapters(ckpts: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("adapters")
    out = {"ffn": make_tiny_lora(ckpts["base"], root / "ffn", seed=1)}
    out["attn"] = make_tiny_lora(ckpts["base"], root / "attn", seed=2, targets=("q_proj", "o_proj"))
    for name, (kwargs, _) in REFUSED.items():
        out[name] = make_tiny_lora(ckpts["base"], root / name, seed=3, **kwargs)
    # PEFT itself resets fan_in_fan_out on nn.Linear; a hand-edited config still claims it.
    out["fan_in_fan_out"] = _edit_config(out["ffn"], root / "fifo", fan_in_fan_out=True)
    return out


def _edit_config(src: Path, dst: Path, **fields: object) -> Path:
    shutil.copytree(src, dst)
    cfg = json.loads((dst / ADAPTER_CONFIG).read_text())
    (dst / ADAPTER_CONFIG).write_text(json.dumps({**cfg, **fields}))
    return dst


def _check(adapter: Path, base: Path, fingerprint: str | None = None) -> None:
    b = inspect_folder(base)
    check_fits_base(inspect_folder(adapter), "lora", b.architecture, b.config, b.shape_map(),
                    base_fingerprint=fingerprint or b.fingerprint())  # fmt: skip


def _merge_reading(adapter: Path) -> object:
    config = json.loads((adapter / ADAPTER_CONFIG).read_text())
    return lora_factors(load_file(adapter / ADAPTER_WEIGHTS), config)


@pytest.mark.parametrize("variant", [*REFUSED, "fan_in_fan_out"])
def test_variants_refused_by_registry_and_by_merge(adapters, ckpts, variant):
    """Registration refuses, naming the field, and merge/lora.py refuses the same adapter: the
    two readings of PEFT's format agree on what a plain LoRA is."""
    needle = REFUSED[variant][1] if variant in REFUSED else "fan_in_fan_out"
    with pytest.raises(CheckpointError, match=needle):
        _check(adapters[variant], ckpts["base"])
    with pytest.raises(MergeError):
        _merge_reading(adapters[variant])


def test_plain_adapters_fit_and_summarise(adapters, ckpts):
    for name in ("ffn", "attn"):
        _check(adapters[name], ckpts["base"])
    ffn = lora_summary(inspect_folder(adapters["ffn"]))
    assert ffn.as_dict() == {"rank": 4, "alpha": 8.0, "layers": [0, 1], "only_ffn": True,
                             "targets": ["down_proj", "gate_proj", "up_proj"]}  # fmt: skip
    attn = inspect_folder(adapters["attn"])
    assert not lora_targets_only_ffn(attn)
    assert lora_summary(attn).targets == ["o_proj", "q_proj"]


def test_base_model_name_or_path_is_not_trusted(adapters, ckpts, tmp_path):
    """The adapter's claim about its base decides nothing: a bogus claim still fits the base it
    fits, and naming the right base does not make a misfit fit."""
    bogus = _edit_config(adapters["ffn"], tmp_path / "bogus",
                         base_model_name_or_path="/nonexistent/other-model")  # fmt: skip
    _check(bogus, ckpts["base"])
    claims = _edit_config(adapters["ffn"], tmp_path / "claims",
                          base_model_name_or_path=str(ckpts["wrong_shape"]))  # fmt: skip
    with pytest.raises(CheckpointError, match="does not fit base tensor"):
        _check(claims, ckpts["wrong_shape"])


def test_stray_full_tensor_in_adapter_refused(adapters, ckpts, tmp_path):
    """A base-named tensor smuggled into adapter_model.safetensors (a modules_to_save copy under
    another name) is no LoRA weight, though its shape fits the base."""
    d = shutil.copytree(adapters["ffn"], tmp_path / "stray")
    tensors = load_file(d / ADAPTER_WEIGHTS)
    tensors["base_model.model.lm_head.weight"] = load_file(ckpts["base"] / "model.safetensors")[
        "lm_head.weight"
    ]
    save_file(tensors, d / ADAPTER_WEIGHTS)
    with pytest.raises(CheckpointError, match="lm_head.weight' is not a lora_A / lora_B weight"):
        _check(d, ckpts["base"])


@pytest.mark.parametrize(
    ("tensors", "needle"),
    [
        ({"model.layers.0.router_row": (64,)}, "shape [64], expected [128]"),
        ({"model.layers.7.router_row": (128,)}, "layer 7 is beyond the base's 2"),
        ({"model.layers.0.router_bias": (2,)}, "expected a scalar"),
        ({"router_row": (128,)}, "expected model.layers.<i>.<field>"),
    ],
)
def test_expert_extras_of_an_adapter_are_checked(adapters, ckpts, tmp_path, tensors, needle):
    import torch

    d = shutil.copytree(adapters["ffn"], tmp_path / "extras")
    save_file({k: torch.zeros(s) for k, s in tensors.items()}, d / EXPERT_FILE)
    with pytest.raises(CheckpointError, match=rf"{EXPERT_FILE}: tensor .*{re.escape(needle)}"):
        _check(d, ckpts["base"])


def test_recorded_base_fingerprint_must_match(adapters, ckpts, tmp_path):
    """Same shapes, other weights: only the fingerprint the trainer recorded tells them apart."""
    import torch

    d = shutil.copytree(adapters["ffn"], tmp_path / "fp")
    extras = {"model.layers.0.router_row": torch.zeros(128)}
    other = inspect_folder(ckpts["dense"]).fingerprint()
    save_file(extras, d / EXPERT_FILE, metadata={BASE_FINGERPRINT_KEY: other})
    _check(d, ckpts["dense"])
    with pytest.raises(CheckpointError, match=f"{BASE_FINGERPRINT_KEY}: the adapter was trained"):
        _check(d, ckpts["base"])


def test_registry_records_and_shows_lora_targets(registered, adapters):
    registered("registry", "add-expert", adapters["attn"], "--name", "attn", "--owner", "bob",
               "--base", "tiny", "--domain", "chat", "--kind", "lora")  # fmt: skip
    doc = json.loads(registered("registry", "show", "attn", "--json").stdout)
    assert doc["lora"] == {"rank": 4, "alpha": 8.0, "targets": ["o_proj", "q_proj"],
                           "layers": [0, 1], "only_ffn": False}  # fmt: skip
    text = registered("registry", "show", "attn").stdout
    assert "rank 4, alpha 8, targets o_proj,q_proj, layers 0,1; not FFN only" in text
    listed = json.loads(registered("registry", "list", "--json").stdout)["experts"]
    assert {e["name"]: e["lora"] for e in listed} == {"code": None, "attn": doc["lora"]}
