"""LoRA experts as compose inputs: a PEFT adapter folder seen as the full checkpoint it stands for.

The materialised path (`lora: materialised`) needs nothing else: :class:`LoraExpert` answers
`read(name)` with base + scale * B @ A (merge.lora, the same float32 sum and single rounding as
`apply_lora` and PEFT's merge_and_unload) and every other tensor from the base, so verification,
router rows (the adapter folder's composer_expert.safetensors) and the recipe treat it like a full
expert. The shared-base path reads its factors (`factors`) instead of dense weights.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from composer.checkpoint import Checkpoint, SafetensorsFile
from composer.errors import PlanError
from merge.lora import PEFT_PREFIX, LoraFactor, lora_factors
from registry.checkpoint import ADAPTER_CONFIG, ADAPTER_WEIGHTS
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


def read_factors(folder: Path) -> dict[str, LoraFactor]:
    """The adapter's factors keyed by the base weight they change (merge.lora's reading)."""
    from safetensors.torch import load_file

    config: dict[str, Any] = json.loads((Path(folder) / ADAPTER_CONFIG).read_text())
    return lora_factors(load_file(Path(folder) / ADAPTER_WEIGHTS), config)


class LoraExpert:
    """The Checkpoint interface compose reads, over a base checkpoint plus an adapter."""

    def __init__(self, folder: Path, base: Checkpoint):
        self.path = Path(folder)  # the adapter folder: composer_expert.safetensors lives here
        self.base = base
        self.config = base.config
        self.factors = read_factors(folder)

    @property
    def num_layers(self) -> int:
        return self.base.num_layers

    def tensor_names(self) -> list[str]:
        return self.base.tensor_names()

    def keys(self) -> list[str]:
        return self.base.tensor_names()

    def __contains__(self, name: str) -> bool:
        return name in self.base

    def meta(self, name: str) -> tuple[torch.dtype, tuple[int, ...]]:
        return self.base.meta(name)

    def read(self, name: str) -> torch.Tensor:
        w = self.base.read(name)
        f = self.factors.get(name)
        return w if f is None else (w.float() + f.delta()).to(w.dtype)

    def same_bytes(self, name: str, other: Checkpoint) -> bool:
        if name in self.factors:
            return bool(torch.equal(self.read(name), other.read(name)))
        return self.base.same_bytes(name, other)

    def close(self) -> None:  # the base is closed by whoever opened it
        pass


def open_expert(kind: str, folder: Path, base: Checkpoint) -> Checkpoint | LoraExpert:
    return LoraExpert(folder, base) if kind == "lora" else Checkpoint(folder)
