"""Does an expert fit the base it claims? Checked from headers and hashes, never from weights."""

from __future__ import annotations

import re
from typing import Any

from registry.checkpoint import ADAPTER_CONFIG, EXPERT_FILE, CheckpointInfo, safetensors_metadata
from registry.errors import CheckpointError
from registry.lora import check_lora_config, lora_key
from registry.tensor_names import is_ffn

EXPERT_KINDS = ("ffn", "dense", "lora")
# composer_expert.safetensors metadata: the fingerprint of the base an adapter was trained on.
BASE_FINGERPRINT_KEY = "base_fingerprint"
_EXTRA_KEY = re.compile(r"^model\.layers\.(\d+)\.(domain_embedding|router_row|router_bias|\w+)$")


def check_fits_base(
    expert: CheckpointInfo,
    kind: str,
    base_architecture: str,
    base_config: dict[str, Any],
    base_tensors: dict[str, list[Any]],
    base_fingerprint: str | None = None,
) -> None:
    """Raise CheckpointError naming the first tensor that does not fit the base.

    base_tensors maps name -> [dtype, shape, sha256], as stored with a registered base. A LoRA
    expert whose composer_expert.safetensors records the fingerprint of the base it was trained
    on must name ``base_fingerprint`` (shapes alone cannot tell two same-sized bases apart).
    """
    where = expert.path
    if kind not in EXPERT_KINDS:
        raise CheckpointError(f"--kind: unknown value '{kind}'; expected one of ffn, dense, lora")
    if kind == "lora":
        if expert.kind != "lora":
            raise CheckpointError(
                f"{where}: --kind lora needs a PEFT adapter folder (adapter_config.json)"
            )
        check_lora_config(expert.config, str(expert.path / ADAPTER_CONFIG))
        _check_lora(expert, base_tensors)
        _check_extras(expert, base_config)
        _check_trained_on(expert, base_fingerprint)
        return
    if expert.kind != "model":
        raise CheckpointError(
            f"{where}: is a PEFT adapter; register it with --kind lora, not --kind {kind}"
        )
    if expert.architecture != base_architecture:
        raise CheckpointError(
            f"{where / 'config.json'}: architectures: '{expert.architecture}' does not fit the "
            f"base's '{base_architecture}'"
        )
    for name, t in sorted(expert.tensors.items()):
        if name not in base_tensors:
            raise CheckpointError(f"{where / t.file}: tensor '{name}' does not exist in the base")
        base_shape = tuple(base_tensors[name][1])
        if t.shape != base_shape:
            raise CheckpointError(
                f"{where / t.file}: tensor '{name}' has shape {list(t.shape)}, "
                f"the base has {list(base_shape)}"
            )
    missing = sorted(set(base_tensors) - set(expert.tensors))
    if missing:
        raise CheckpointError(f"{where}: tensor '{missing[0]}' of the base is missing")
    if kind == "ffn":
        # FlexOlmo: every shared weight must be bit-identical to the public model's.
        for name, t in sorted(expert.tensors.items()):
            if not is_ffn(name) and t.sha256 != base_tensors[name][2]:
                raise CheckpointError(
                    f"{where / t.file}: tensor '{name}' differs from the base; an ffn expert "
                    f"may only change FFN (mlp) weights (use --kind dense for a full fine-tune)"
                )
        _check_extras(expert, base_config)


def _check_extras(expert: CheckpointInfo, base_config: dict[str, Any]) -> None:
    hidden = base_config.get("hidden_size")
    layers = base_config.get("num_hidden_layers")
    for name, t in sorted(expert.extras.items()):
        m = _EXTRA_KEY.match(name)
        where = f"{expert.path / EXPERT_FILE}: tensor '{name}'"
        if not m:
            raise CheckpointError(f"{where}: expected model.layers.<i>.<field>")
        if layers is not None and int(m.group(1)) >= int(layers):
            raise CheckpointError(f"{where}: layer {m.group(1)} is beyond the base's {layers}")
        if m.group(2) in ("domain_embedding", "router_row") and t.shape != (hidden,):
            raise CheckpointError(f"{where}: shape {list(t.shape)}, expected [{hidden}]")
        if m.group(2) == "router_bias" and t.shape not in ((), (1,)):
            raise CheckpointError(f"{where}: shape {list(t.shape)}, expected a scalar")


def _check_trained_on(expert: CheckpointInfo, base_fingerprint: str | None) -> None:
    if EXPERT_FILE not in expert.manifest:
        return
    recorded = safetensors_metadata(expert.path / EXPERT_FILE).get(BASE_FINGERPRINT_KEY)
    if recorded and base_fingerprint and recorded != base_fingerprint:
        raise CheckpointError(
            f"{expert.path / EXPERT_FILE}: {BASE_FINGERPRINT_KEY}: the adapter was trained on a "
            f"base with fingerprint {recorded[:12]}..., not this base ({base_fingerprint[:12]}...)"
        )


def _check_lora(expert: CheckpointInfo, base_tensors: dict[str, list[Any]]) -> None:
    ranks: dict[str, dict[str, tuple[int, ...]]] = {}
    for name, t in sorted(expert.tensors.items()):
        where = f"{expert.path / t.file}: tensor '{name}'"
        key = lora_key(name)
        if key is None:
            raise CheckpointError(
                f"{where} is not a lora_A / lora_B weight (embedding LoRAs, biases and "
                "modules_to_save are refused)"
            )
        module, ab = key
        base_name = f"{module}.weight"
        if base_name not in base_tensors:
            raise CheckpointError(f"{where}: targets '{base_name}', which the base does not have")
        if len(t.shape) != 2:
            raise CheckpointError(f"{where}: expected a 2-D LoRA matrix, got {list(t.shape)}")
        out_f, in_f = base_tensors[base_name][1]
        ok = t.shape[1] == in_f if ab == "A" else t.shape[0] == out_f
        if not ok:
            raise CheckpointError(
                f"{where}: shape {list(t.shape)} does not fit base tensor '{base_name}' "
                f"of shape {[out_f, in_f]}"
            )
        ranks.setdefault(module, {})[ab] = t.shape
    for module, ab in sorted(ranks.items()):
        if set(ab) != {"A", "B"}:
            raise CheckpointError(f"{expert.path}: module '{module}' has lora_A or lora_B missing")
        if ab["A"][0] != ab["B"][1]:
            raise CheckpointError(
                f"{expert.path}: module '{module}': lora_A rank {ab['A'][0]} != lora_B rank "
                f"{ab['B'][1]}"
            )
