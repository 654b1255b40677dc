"""PEFT LoRA adapters as inputs: an adapter seen as the full checkpoint it stands for.

A LoRA expert's weights are base + scale * B @ A (merge.lora, checked against PEFT's
merge_and_unload), its delta zero on every weight it does not touch. ``AdapterCheckpoint``
presents base + adapter through every read compose and merging make of a checkpoint (keys,
tensor_names, meta, read, read_rows, same_bytes), so a materialised compose and every merge method
run on LoRA experts unchanged and give exactly what they give on the checkpoint
``merge.lora.apply_lora`` would write; compose's shared-base layout takes its ``factors``. Only
the factors of the tensor at hand are read; rows of the delta are computed rank by rank
(LoraFactor.delta_rows), so a streamed block equals the same rows of the whole tensor.
"""

from __future__ import annotations

import json
from functools import cached_property
from pathlib import Path
from typing import Any

import torch

from composer.checkpoint import Checkpoint, SafetensorsFile
from composer.errors import PlanError
from merge.errors import MergeError
from merge.lora import LoraFactor, lora_factors, split_lora_key
from registry.checkpoint import ADAPTER_CONFIG, ADAPTER_WEIGHTS


class Adapter:
    """A PEFT adapter folder: its config, and its factors read one weight at a time."""

    def __init__(self, path: Path):
        self.path = Path(path)
        cfg = self.path / ADAPTER_CONFIG
        if not cfg.is_file():
            raise PlanError(f"{self.path}: no {ADAPTER_CONFIG} (not a PEFT adapter folder)")
        self.config: dict[str, Any] = json.loads(cfg.read_text())
        self.file = SafetensorsFile(self.path / ADAPTER_WEIGHTS)
        self.keys: dict[str, dict[str, str]] = {}  # base weight -> {"A": key, "B": key}
        for key in self.file.keys():  # noqa: SIM118 (not a dict)
            split = split_lora_key(key)
            if split is None:
                raise PlanError(
                    f"{self.file.path}: tensor '{key}' is not a lora_A / lora_B weight "
                    "(embedding LoRAs, biases and modules_to_save are not supported)"
                )
            self.keys.setdefault(split[0], {})[split[1]] = key
        try:  # the config's own refusals (DoRA, LoRA biases, ...) before any weight is read
            lora_factors({}, self.config)
        except MergeError as e:
            raise PlanError(f"{self.path}: {e}") from None

    @property
    def weights(self) -> list[str]:
        """The base weights the adapter changes."""
        return sorted(self.keys)

    def shape(self, weight: str) -> tuple[int, int, int]:
        """(out, in, rank) from the headers."""
        _, a = self.file.meta(self.keys[weight]["A"])
        _, b = self.file.meta(self.keys[weight]["B"])
        return int(b[0]), int(a[1]), int(a[0])

    @property
    def rank(self) -> int:
        """The largest rank of any weight (PEFT's r when it has no rank_pattern)."""
        return max((self.shape(w)[2] for w in self.keys), default=0)

    def factor(self, weight: str) -> LoraFactor | None:
        """The factors of ``weight``, None when the adapter leaves it alone."""
        if weight not in self.keys:
            return None
        tensors = {k: self.file.read(k) for k in self.keys[weight].values()}
        try:
            return lora_factors(tensors, self.config)[weight]
        except MergeError as e:
            raise MergeError(f"{self.path}: {e}") from None

    def check_fits(self, base: Checkpoint) -> None:
        """Every adapted weight exists in the base with the delta's shape (headers only)."""
        for w, ab in sorted(self.keys.items()):
            if set(ab) != {"A", "B"}:
                raise PlanError(f"{self.file.path}: '{w}' lacks lora_A or lora_B")
            if w not in base:
                raise PlanError(f"{self.path}: adapts '{w}', which the base does not have")
            (_, a), (_, b) = self.file.meta(ab["A"]), self.file.meta(ab["B"])
            if len(a) != 2 or len(b) != 2 or a[0] != b[1]:
                raise PlanError(
                    f"{self.file.path}: '{w}': lora_A {list(a)} and lora_B {list(b)} do not "
                    "form a low-rank product"
                )
            _, shape = base.meta(w)
            if tuple(shape) != (b[0], a[1]):
                raise PlanError(
                    f"{self.path}: '{w}': delta {[b[0], a[1]]} does not fit the base's "
                    f"{list(shape)}"
                )

    def close(self) -> None:
        self.file.close()


class AdapterCheckpoint:
    """base + adapter, read like a Checkpoint: adapted weights are (W + delta) in W's dtype,
    summed in float32 and rounded once (as merge.lora.apply_lora); every other tensor is the
    base's own. ``path`` is the adapter folder (its composer_expert.safetensors holds the
    expert's router rows)."""

    def __init__(self, base: Checkpoint, adapter: Adapter):
        self.base, self.adapter = base, adapter
        self.path = adapter.path

    @property
    def num_layers(self) -> int:
        return self.base.num_layers

    def keys(self) -> list[str]:
        return self.base.keys()

    def tensor_names(self) -> list[str]:
        return self.base.tensor_names()

    def __contains__(self, name: str) -> bool:
        return name in self.base

    def meta(self, name: str) -> tuple[torch.dtype, tuple[int, ...]]:
        return self.base.meta(name)

    @cached_property
    def factors(self) -> dict[str, LoraFactor]:
        """Every adapted weight's factors (the shared-base layout stores them all), read once."""
        out = {}
        for w in self.adapter.weights:
            f = self.adapter.factor(w)
            assert f is not None
            out[w] = f
        return out

    def _applied(self, name: str, start: int, rows: torch.Tensor) -> torch.Tensor:
        f = self.adapter.factor(name)
        if f is None:
            return rows
        delta = f.delta_rows(start, start + rows.shape[0])
        return (rows.float() + delta).to(rows.dtype)

    def read(self, name: str) -> torch.Tensor:
        return self._applied(name, 0, self.base.read(name))

    def read_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        return self._applied(name, start, self.base.read_rows(name, start, stop))

    def same_bytes(self, name: str, other: Any) -> bool:
        """True where this tensor is ``other``'s bit for bit. An adapted weight counts as changed
        (its delta is merged, never copied), so only weights the adapter leaves alone are
        compared: with the base itself they are equal without reading."""
        if name in self.adapter.keys:
            return False
        return other is self.base or self.base.same_bytes(name, other)

    def open_all(self) -> None:
        self.base.open_all()

    def close(self) -> None:  # the base is closed by whoever opened it
        self.adapter.close()
