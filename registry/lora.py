"""PEFT LoRA adapters at registration: which variants are accepted, and what an adapter targets.

The registry admits only adapters whose effect is a plain low-rank delta ``W + scale * B @ A`` on
linear weights of the base, the one reading every LoRA consumer here shares (merge/lora.py,
compose, serve). Variants that are something else (DoRA, LoRA biases, embedding LoRAs, full
copies in modules_to_save, fan_in_fan_out Conv1D layers, activated or routed LoRAs) are refused
by name at registration, before a byte is stored. merge/lora.py refuses the same variants when it
reads tensors; merge/ imports nothing of ours, so it cannot call this module: the registry tests
feed the same real PEFT adapters to both and require both to refuse.

Nothing here reads ``base_model_name_or_path``: an adapter's own claim about its base is not
evidence. Fit is checked against the registered base's tensor shapes (registry.compat) and, for
adapters `composer expert train` wrote, the base fingerprint recorded in composer_expert.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from typing import Any

from registry.checkpoint import ADAPTER_CONFIG, ADAPTER_WEIGHTS, CheckpointInfo
from registry.errors import CheckpointError
from registry.tensor_names import is_ffn, layer_of

# PEFT saves adapter tensors under the wrapped model's prefix, without the adapter name.
PEFT_PREFIX = "base_model.model."
LORA_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<ab>[AB])\.weight$")
# adapter_config.json fields that, when set, make an adapter something other than a plain delta.
REFUSED_CONFIG = {
    "use_dora": "DoRA adapters are not a low-rank delta",
    "fan_in_fan_out": "fan_in_fan_out (Conv1D) layers are not supported",
    "lora_bias": "adapters with LoRA biases are refused",
    "modules_to_save": "modules_to_save (full copies of base modules) are refused",
    "trainable_token_indices": "trainable token embeddings are refused",
    "target_parameters": "LoRAs on raw parameters (not linear layers) are refused",
    "alora_invocation_tokens": "activated LoRAs (on only after invocation tokens) are refused",
    "arrow_config": "Arrow-routed LoRA libraries are refused",
    "layer_replication": "layer replication changes the base's depth",
}


@dataclass(frozen=True)
class LoraSummary:
    """What a registered adapter changes: ranks, targeted module kinds and layers."""

    rank: int  # the largest rank (rank_pattern may vary it per module)
    alpha: float
    targets: list[str]  # module kinds, e.g. ["down_proj", "gate_proj", "up_proj"]
    layers: list[int]
    only_ffn: bool  # every target is an FFN (mlp) weight: composable FlexOlmo-style

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def check_lora_config(config: dict[str, Any], where: str = ADAPTER_CONFIG) -> None:
    """Raise CheckpointError naming the first field of ``config`` that makes it no plain LoRA."""
    peft_type = str(config.get("peft_type", "LORA")).upper()
    if peft_type != "LORA":
        raise CheckpointError(f"{where}: peft_type '{config.get('peft_type')}' is not LORA")
    for flag, why in REFUSED_CONFIG.items():
        if config.get(flag):
            raise CheckpointError(f"{where}: {flag}: {why}")
    if str(config.get("bias", "none")) != "none":
        raise CheckpointError(f"{where}: bias '{config['bias']}': trained biases are refused")


def lora_key(name: str) -> tuple[str, str] | None:
    """(module, 'A' or 'B') of an adapter tensor name, None when it is no lora_A / lora_B weight
    (embedding LoRAs' lora_embedding_A, biases, saved modules)."""
    m = LORA_KEY.match(name.removeprefix(PEFT_PREFIX))
    return (m.group("module"), m.group("ab")) if m else None


def lora_summary(info: CheckpointInfo) -> LoraSummary:
    """Summary of a PEFT LoRA folder as inspect_folder read it (registry.compat has checked it)."""
    if info.kind != "lora":
        raise CheckpointError(f"{info.path}: not a PEFT adapter folder ({ADAPTER_CONFIG})")
    modules: dict[str, int] = {}
    for name, t in info.tensors.items():
        key = lora_key(name)
        if key is None:
            raise CheckpointError(f"{info.path / ADAPTER_WEIGHTS}: tensor '{name}' is no LoRA")
        if key[1] == "A":
            modules[key[0]] = t.shape[0]
    layers = {layer_of(m) for m in modules}
    return LoraSummary(
        rank=max(modules.values(), default=0),
        alpha=float(info.config.get("lora_alpha", info.config.get("r", 8))),
        targets=sorted({m.rsplit(".", 1)[-1] for m in modules}),
        layers=sorted(i for i in layers if i is not None),
        only_ffn=bool(modules) and all(is_ffn(f"{m}.weight") for m in modules),
    )


def lora_targets_only_ffn(info: CheckpointInfo) -> bool:
    """True when every adapted weight is an FFN (mlp) weight: the adapter can be an expert of a
    FlexOlmo-style composition; attention LoRAs are fine for merges only."""
    return lora_summary(info).only_ffn
