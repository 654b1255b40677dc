"""The LoRA expert artifact `composer expert train --lora R` writes: a real PEFT adapter folder.

PEFT itself writes ``adapter_config.json`` and ``adapter_model.safetensors`` (the trained factors
loaded into a PeftModel of the public checkpoint, then ``save_pretrained``), so
``PeftModel.from_pretrained(public, folder)`` loads it and every LoRA reader (merge/lora.py,
vLLM) sees PEFT's own names. Beside them, ``composer_expert.safetensors`` holds the same extras
as a full-FFN expert (domain embedding, router row and bias per layer). The adapter config's
``base_model_name_or_path`` is set to the public folder's name only: the owner's local path is
nobody's business, and the registry trusts the registered base, never this field. PEFT's model
card (README.md) is not kept: it is boilerplate, and the registry hashes every file. The write is
atomic (temp folder, then rename), like composer.train.artifact.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import torch

from composer.train.artifact import replaced_folder, write_extras
from registry.checkpoint import ADAPTER_CONFIG, ADAPTER_WEIGHTS


def write_lora_artifact(
    public_dir: str | Path,
    out_dir: str | Path,
    factors: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
    rank: int,
    alpha: float,
    extras: Mapping[str, torch.Tensor],
    metadata: dict[str, str],
    *,
    overwrite: bool = False,
) -> Path:
    """Write a PEFT LoRA adapter of ``public_dir`` plus the expert extras, atomically.

    ``factors`` maps a module name of the public model (``model.layers.4.mlp.up_proj``) to its
    (A [r, in], B [out, r]); scale = alpha / rank as in PEFT.
    """
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    public_dir, out_dir = Path(public_dir), Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise FileExistsError(f"{out_dir} exists (pass overwrite=True to replace it)")
    modules = sorted(factors)
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=modules, lora_dropout=0.0)
    model = AutoModelForCausalLM.from_pretrained(public_dir, dtype=torch.float32)
    peft_model = get_peft_model(model, config)
    params = dict(peft_model.named_parameters())
    with torch.no_grad():
        for module, (a, b) in factors.items():
            for half, t in (("A", a), ("B", b)):
                params[f"base_model.model.{module}.lora_{half}.default.weight"].copy_(t)
    with replaced_folder(out_dir) as tmp:
        peft_model.save_pretrained(tmp, safe_serialization=True)
        (tmp / "README.md").unlink(missing_ok=True)
        cfg_path = tmp / ADAPTER_CONFIG
        cfg = json.loads(cfg_path.read_text())
        cfg["base_model_name_or_path"] = public_dir.name
        cfg["target_modules"] = sorted(cfg["target_modules"])  # PEFT keeps a set: fix the order
        cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
        if not (tmp / ADAPTER_WEIGHTS).is_file():
            raise RuntimeError(f"PEFT did not write {ADAPTER_WEIGHTS}")
        write_extras(tmp, extras, metadata)
    return out_dir
