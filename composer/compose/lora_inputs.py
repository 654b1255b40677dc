"""LoRA experts as compose inputs: a PEFT adapter folder checked against the base, then opened.

Plan-time checks read only the adapter's header. At build time the materialised path (`lora:
materialised`) needs nothing else: composer.adapter_checkpoint.AdapterCheckpoint answers
`read(name)` with base + scale * B @ A (merge.lora, the same float32 sum and single rounding as
`apply_lora` and PEFT's merge_and_unload) and every other tensor from the base, so verification,
router rows (the adapter folder's composer_expert.safetensors) and the recipe treat it like a full
expert. The shared-base path reads its factors (`factors`) instead of dense weights.
"""

from __future__ import annotations

from pathlib import Path

from composer.adapter_checkpoint import Adapter, AdapterCheckpoint
from composer.checkpoint import Checkpoint, SafetensorsFile
from composer.errors import PlanError
from merge.lora import PEFT_PREFIX
from registry.checkpoint import ADAPTER_WEIGHTS
from registry.tensor_names import is_ffn


def adapter_targets(folder: Path) -> dict[str, tuple[tuple[int, ...], tuple[int, ...]]]:
    """Base weight name -> (lora_A shape, lora_B shape), read from the adapter's header only."""
    path = Path(folder) / ADAPTER_WEIGHTS
    if not path.is_file():
        raise PlanError(f"{folder}: a LoRA adapter folder needs {ADAPTER_WEIGHTS}")
    f = SafetensorsFile(path)
    try:
        halves: dict[str, dict[str, tuple[int, ...]]] = {}
        for name in f.keys():  # noqa: SIM118  (SafetensorsFile is no mapping)
            key = name.removeprefix(PEFT_PREFIX)
            for ab in ("A", "B"):
                suffix = f".lora_{ab}.weight"
                if key.endswith(suffix):
                    halves.setdefault(key[: -len(suffix)] + ".weight", {})[ab] = f.meta(name)[1]
                    break
            else:
                raise PlanError(f"{path}: tensor '{name}' is not a lora_A / lora_B weight")
    finally:
        f.close()
    out = {}
    for weight, ab in sorted(halves.items()):
        if set(ab) != {"A", "B"}:
            raise PlanError(f"{path}: module '{weight}' lacks lora_A or lora_B")
        out[weight] = (ab["A"], ab["B"])
    return out


def check_lora_expert(
    folder: Path, name: str, base: dict[str, tuple[int, ...]], ffn_only: bool, where: str
) -> None:
    """Plan-time checks of a LoRA expert against the base's tensor shapes (``base``: name ->
    shape): every target exists and fits; with ``ffn_only`` (FlexOlmo, shared-base) every target
    is an FFN weight, since the shared weights must stay the public model's."""
    for weight, (a, b) in adapter_targets(folder).items():
        if weight not in base:
            raise PlanError(f"{where}: expert '{name}': adapts '{weight}', which the base lacks")
        out_f, in_f = base[weight]
        if len(a) != 2 or len(b) != 2 or a[1] != in_f or b[0] != out_f or a[0] != b[1]:
            raise PlanError(
                f"{where}: expert '{name}': lora_A {list(a)} and lora_B {list(b)} of '{weight}' "
                f"do not fit the base weight {[out_f, in_f]}"
            )
        if ffn_only and not is_ffn(weight):
            raise PlanError(
                f"{where}: expert '{name}': the adapter changes '{weight}', a shared (non-FFN) "
                "weight; in a FlexOlmo composition every expert keeps the public model's shared "
                "weights, so only FFN (mlp) modules may be adapted"
            )


def open_expert(kind: str, folder: Path, base: Checkpoint) -> Checkpoint | AdapterCheckpoint:
    """A compose input: a full checkpoint, or a LoRA adapter over the opened ``base``."""
    return AdapterCheckpoint(base, Adapter(folder)) if kind == "lora" else Checkpoint(folder)
