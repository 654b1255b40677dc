"""LoRA adapters as weight deltas: a PEFT adapter's tensors and config in, per-weight factors out.

One reading of PEFT's format for every LoRA path (merges, materialised and shared-base
composition), so they cannot disagree on names or scales. A PEFT LoRA on a linear layer changes
its weight W [out, in] to W + scale * B @ A with A = lora_A [r, in], B = lora_B [out, r] and
scale = alpha / r (alpha / sqrt(r) with rsLoRA); `alpha_pattern` overrides alpha per module.
Variants whose effect is not such a delta (DoRA, LoRA biases, embedding or conv LoRAs,
fan_in_fan_out layers) are refused by name, never approximated.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from merge.errors import MergeError

# PEFT saves adapter tensors under the wrapped model's prefix, without the adapter name.
PEFT_PREFIX = "base_model.model."
_LORA_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<ab>[AB])\.weight$")
_REFUSED_FLAGS = {
    "use_dora": "DoRA adapters are not a low-rank delta",
    "fan_in_fan_out": "fan_in_fan_out (Conv1D) layers are not supported",
}


@dataclass(frozen=True)
class LoraFactor:
    """One adapted weight: delta = scale * b @ a."""

    a: torch.Tensor  # [r, in]
    b: torch.Tensor  # [out, r]
    scale: float

    @property
    def rank(self) -> int:
        return int(self.a.shape[0])

    def delta(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The dense delta [out, in], computed in float32 and cast to ``dtype``."""
        return self.delta_rows(0, int(self.b.shape[0])).to(dtype)

    def delta_rows(self, start: int, stop: int) -> torch.Tensor:
        """Rows [start, stop) of the float32 delta, the same bits as those rows of ``delta()``.

        A matmul of a row slice need not round like the whole one (BLAS picks kernels by
        shape), so the product is summed rank by rank with elementwise ops, whose rounding
        does not depend on the block: streamed merges then equal whole-tensor ones exactly.
        """
        b, a = self.b[start:stop].float(), self.a.float()
        out = torch.zeros((b.shape[0], a.shape[1]), dtype=torch.float32)
        for k in range(self.rank):
            out.add_(b[:, k : k + 1] * a[k])
        return out.mul_(self.scale)


def _pattern_value(patterns: Mapping[str, Any], module: str, default: Any) -> Any:
    """PEFT's rule for rank_pattern / alpha_pattern: the first key that ends the module name."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def split_lora_key(name: str) -> tuple[str, str] | None:
    """``(base weight name, "A" or "B")`` of a PEFT adapter tensor name, None for other names."""
    m = _LORA_KEY.match(name.removeprefix(PEFT_PREFIX))
    return (f"{m.group('module')}.weight", m.group("ab")) if m else None


def lora_factors(
    tensors: Mapping[str, torch.Tensor], config: Mapping[str, Any]
) -> dict[str, LoraFactor]:
    """Factors keyed by the base weight they change (e.g. ``model.layers.0.mlp.up_proj.weight``).

    ``tensors`` is the content of adapter_model.safetensors, ``config`` adapter_config.json.
    """
    if str(config.get("peft_type", "LORA")).upper() != "LORA":
        raise MergeError(f"adapter_config.json: peft_type '{config.get('peft_type')}' is not LORA")
    for flag, why in _REFUSED_FLAGS.items():
        if config.get(flag):
            raise MergeError(f"adapter_config.json: {flag}: {why}")
    if config.get("lora_bias"):
        raise MergeError("adapter_config.json: lora_bias: adapters with LoRA biases are refused")
    alpha = float(config.get("lora_alpha", config.get("r", 8)))
    alpha_pattern = dict(config.get("alpha_pattern") or {})
    rslora = bool(config.get("use_rslora", False))

    halves: dict[str, dict[str, torch.Tensor]] = {}
    for name, t in tensors.items():
        key = name.removeprefix(PEFT_PREFIX)
        m = _LORA_KEY.match(key)
        if not m:
            raise MergeError(
                f"adapter_model.safetensors: tensor '{name}' is not a lora_A / lora_B weight "
                "(embedding LoRAs, biases and modules_to_save are not supported)"
            )
        halves.setdefault(m.group("module"), {})[m.group("ab")] = t
    out: dict[str, LoraFactor] = {}
    for module, ab in sorted(halves.items()):
        if set(ab) != {"A", "B"}:
            raise MergeError(f"adapter_model.safetensors: module '{module}' lacks lora_A or lora_B")
        a, b = ab["A"], ab["B"]
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
            raise MergeError(
                f"adapter_model.safetensors: module '{module}': lora_A {list(a.shape)} and "
                f"lora_B {list(b.shape)} do not form a low-rank product"
            )
        r = int(a.shape[0])
        module_alpha = float(_pattern_value(alpha_pattern, module, alpha))
        scale = module_alpha / math.sqrt(r) if rslora else module_alpha / r
        out[f"{module}.weight"] = LoraFactor(a=a, b=b, scale=scale)
    return out


def lora_deltas(
    factors: Mapping[str, LoraFactor], dtype: torch.dtype = torch.float32
) -> dict[str, torch.Tensor]:
    """Dense deltas keyed by base weight name."""
    return {name: f.delta(dtype) for name, f in factors.items()}


def apply_lora(
    base: Mapping[str, torch.Tensor], factors: Mapping[str, LoraFactor]
) -> dict[str, torch.Tensor]:
    """The base state dict with every adapted weight replaced by W + delta (in W's dtype).

    The sum is formed in float32 and rounded once, like PEFT's merge_and_unload on float32 bases.
    """
    missing = sorted(set(factors) - set(base))
    if missing:
        raise MergeError(f"adapter targets '{missing[0]}', which the base does not have")
    out = dict(base)
    for name, f in factors.items():
        w = base[name]
        if tuple(w.shape) != (f.b.shape[0], f.a.shape[1]):
            raise MergeError(
                f"adapter for '{name}': delta {[f.b.shape[0], f.a.shape[1]]} does not fit the "
                f"base weight {list(w.shape)}"
            )
        out[name] = (w.float() + f.delta()).to(w.dtype)
    return out
