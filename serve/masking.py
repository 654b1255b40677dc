"""Per-request expert masks inside the vLLM engine (with serve/moe_backend.py, the only modules
touching engine internals).

Requests carry their allowed experts in `SamplingParams.extra_args[MASK_KEY]` (set over HTTP
with `vllm_xargs`). Before every forward step, the model runner's `_prepare_inputs` lays tokens
out request after request in `input_batch.req_ids` order; our hook builds one additive mask row
per token from that layout. With the default MoE backend (serve/moe_backend.py) our routing
kernel reads it as a bool mask; with `COMPOSER_MOE_BACKEND=vllm` every MoE gate adds it to its
router logits before vLLM's top-k.

A masked logit gets MASK_VALUE: finite (no inf - inf = NaN if a row were ever fully masked) but
so negative that exp() underflows to exactly 0 in float32 and bfloat16. The expert then drops
out of the softmax denominator too, so masking equals removal for both Mixtral (top-k then
renormalise) and FlexOlmo (softmax over all experts, no renormalisation).

Fail closed: a request without a mask gets the public base slots only (`resolve_allowed`), an
unreadable one no expert, and a token allowed no expert gets a zero MoE output.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np
import torch

from registry.tensor_names import layer_of

MASK_KEY = "composer_allowed_experts"
MASK_VALUE = -1.0e9

# The mask of the step being run: (num_scheduled_tokens, num_experts), or None when every
# request in the step may use every expert (then gates run unchanged, at zero cost).
_current_mask: torch.Tensor | None = None
# Rows of that mask that allow no expert at all: [T, 1] bool, or None when there are none.
_current_dead: torch.Tensor | None = None


@dataclass(frozen=True)
class MaskingConfig:
    """What a model's runner needs to turn requests into masks, kept on the model itself
    (`CONFIG_ATTR`): two engines in one process (in-process vLLM) each mask with their own."""

    num_experts: int
    # What a request without a mask gets: the ungoverned base slots (the public model), never all.
    default_allowed: tuple[int, ...] = ()


CONFIG_ATTR = "_composer_masking"
# On the model runner: request id -> its allowed experts, parsed once per request, not per step.
CACHE_ATTR = "_composer_allowed_by_req"


def resolve_allowed(
    extra_args: dict[str, Any] | None, num_experts: int, default: tuple[int, ...] = ()
) -> tuple[int, ...] | None:
    """The experts a request may use: sorted indices, or None when that is every expert.

    Fail closed: a request without a mask gets `default` (the server always sends one; only a
    path that bypasses it, such as vLLM's beam search, would not), an unreadable mask gets
    no expert, and indices outside the model are ignored.
    """
    if not extra_args or MASK_KEY not in extra_args:
        value: Any = default
    else:
        value = extra_args[MASK_KEY]
    if isinstance(value, (int, str)):
        value = [value]
    try:
        allowed = tuple(sorted({i for i in (int(v) for v in value) if 0 <= i < num_experts}))
    except (TypeError, ValueError):
        return ()
    return None if len(allowed) == num_experts else allowed


@lru_cache(maxsize=1024)
def mask_row(allowed: tuple[int, ...] | None, num_experts: int) -> torch.Tensor:
    """One additive row: 0 for allowed experts, MASK_VALUE for the rest (all 0 for None)."""
    if allowed is None:
        return torch.zeros(num_experts, dtype=torch.float32)
    row = torch.full((num_experts,), MASK_VALUE, dtype=torch.float32)
    row[[i for i in allowed if 0 <= i < num_experts]] = 0.0
    return row


# The last step's layout and mask: in steady decoding the batch and its masks repeat, so the
# per-step cost is one tuple comparison.
_last: tuple[Any, torch.Tensor | None] = (None, None)


def build_token_mask(
    allowed_per_request: Sequence[tuple[int, ...] | None],
    tokens_per_request: Sequence[int] | np.ndarray,
    num_experts: int,
) -> torch.Tensor | None:
    """Expand per-request allowed sets to per-token mask rows (None if nobody masks)."""
    global _last
    if all(a is None for a in allowed_per_request):
        return None
    counts = tuple(int(c) for c in tokens_per_request)
    key = (tuple(allowed_per_request), counts, num_experts)
    if _last[0] == key:
        return _last[1]
    rows = torch.stack([mask_row(a, num_experts) for a in allowed_per_request])
    if any(c != 1 for c in counts):
        rows = rows.repeat_interleave(torch.tensor(counts), dim=0)
    _last = (key, rows)
    return rows


def set_current_mask(mask: torch.Tensor | None) -> None:
    global _current_mask, _current_dead
    if mask is _current_mask:  # steady decoding: the same cached mask, step after step
        return
    _current_mask = mask
    dead = None if mask is None else (mask == MASK_VALUE).all(dim=1, keepdim=True)
    _current_dead = dead if dead is not None and bool(dead.any()) else None


def current_mask() -> torch.Tensor | None:
    return _current_mask


def zero_dead_rows(out: torch.Tensor) -> torch.Tensor:
    """Zero the MoE output of tokens whose mask allows no expert (additive masking alone would
    leave their logits all equal, and top-k would still pick experts)."""
    dead = _current_dead
    if dead is None:
        return out
    n = out.shape[0]
    if dead.shape[0] < n:  # padded batch: padding tokens stay unmasked
        dead = torch.cat([dead, dead.new_zeros((n - dead.shape[0], 1))])
    return out.masked_fill(dead[:n].to(out.device), 0.0)


def apply_mask(router_logits: torch.Tensor) -> torch.Tensor:
    """Add the current step's mask to router logits (num_tokens, num_experts)."""
    mask = _current_mask
    if mask is None:
        return router_logits
    if router_logits.shape[-1] != mask.shape[-1]:  # never route around a mask: fail closed
        raise RuntimeError(
            f"expert mask for {mask.shape[-1]} experts, router logits for {router_logits.shape[-1]}"
        )
    n = router_logits.shape[0]
    if mask.shape[0] != n:
        if mask.shape[0] < n:  # padded batch: padding tokens stay unmasked
            mask = torch.cat([mask, mask.new_zeros((n - mask.shape[0], mask.shape[1]))])
        mask = mask[:n]
    if mask.device != router_logits.device or mask.dtype != router_logits.dtype:
        mask = mask.to(device=router_logits.device, dtype=router_logits.dtype)
    return router_logits + mask


def install_gate_masks(
    model: torch.nn.Module,
    router_bias: dict[int, torch.Tensor] | None = None,
    dense_layers: Collection[int] = (),
) -> int:
    """Make every MoE gate (vLLM `GateLinear`) of `model` add the current mask; returns count.

    `router_bias` (layer -> [E]) is added to that layer's logits on every step: the FlexOlmo
    experts' trained bias, which Mixtral's checkpoint format has no tensor for. Gates of
    `dense_layers` (identical copies of a dense FFN, see docs/spec.md) are never masked. The
    MoE runners of masked layers zero the output of tokens that may use no expert.
    """
    from vllm.model_executor.layers.fused_moe import MoERunner
    from vllm.model_executor.layers.fused_moe.router.gate_linear import GateLinear

    masked_cls = _masked_gate_class(GateLinear)
    bias = router_bias or {}
    count = 0
    for name, module in model.named_modules():
        layer = layer_of(name)
        if isinstance(module, GateLinear):
            if type(module) is not masked_cls:
                module.__class__ = masked_cls
            module._composer_bias = bias.get(layer)  # type: ignore[attr-defined]
            module._composer_masked = layer not in dense_layers  # type: ignore[attr-defined]
            count += 1
        elif isinstance(module, MoERunner) and layer not in dense_layers:
            module.__class__ = _dead_zeroing_runner_class(type(module))
    return count


_ZEROING_RUNNER: dict[type, type] = {}


def _dead_zeroing_runner_class(base: type) -> type:
    if base in _ZEROING_RUNNER.values():
        return base
    if base not in _ZEROING_RUNNER:

        def _apply_quant_method(
            self: Any, hidden_states: torch.Tensor, *args: Any, **kw: Any
        ) -> Any:
            shared, routed = base._apply_quant_method(self, hidden_states, *args, **kw)
            if _current_dead is not None:
                if not isinstance(routed, torch.Tensor):  # cannot zero it: refuse, never leak
                    raise RuntimeError("tokens allowing no expert on a non-tensor MoE output")
                routed = zero_dead_rows(routed)
            return shared, routed

        _ZEROING_RUNNER[base] = type(
            f"Masked{base.__name__}", (base,), {"_apply_quant_method": _apply_quant_method}
        )
    return _ZEROING_RUNNER[base]


_MASKED_GATE: dict[type, type] = {}


def _masked_gate_class(base: type) -> type:
    if base not in _MASKED_GATE:

        class MaskedGateLinear(base):  # type: ignore[misc, valid-type]
            _composer_bias: torch.Tensor | None = None
            _composer_masked: bool = True

            def forward(self, x: torch.Tensor) -> Any:
                out = super().forward(x)
                logits = out[0] if isinstance(out, tuple) else out
                if self._composer_bias is not None:
                    b = self._composer_bias
                    if b.device != logits.device or b.dtype != logits.dtype:
                        b = self._composer_bias = b.to(device=logits.device, dtype=logits.dtype)
                    logits = logits + b
                if self._composer_masked:
                    logits = apply_mask(logits)
                return (logits, *out[1:]) if isinstance(out, tuple) else logits

        _MASKED_GATE[base] = MaskedGateLinear
    return _MASKED_GATE[base]


def install_runner_hook(
    model: torch.nn.Module, num_experts: int, default_allowed: Sequence[int] = ()
) -> None:
    """Make the V1 model runner publish each step's token mask for `model`.

    `default_allowed`: the experts of a request that carries no mask (the public base slots).
    The settings are kept on `model`; vLLM's runner class is wrapped once per process, and each
    runner reads them from the model it runs (none: a model without masks, no mask).
    """
    setattr(model, CONFIG_ATTR, MaskingConfig(num_experts, tuple(default_allowed)))
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    original = GPUModelRunner._prepare_inputs
    if getattr(original, "_composer_hooked", False):
        return

    def _prepare_inputs(self: Any, scheduler_output: Any, num_scheduled_tokens: Any) -> Any:
        config: MaskingConfig | None = getattr(self.get_model(), CONFIG_ATTR, None)
        if config is None:
            set_current_mask(None)
            return original(self, scheduler_output, num_scheduled_tokens)
        req_ids = self.input_batch.req_ids[: self.input_batch.num_reqs]
        by_req: dict[str, tuple[Any, tuple[int, ...] | None]] = self.__dict__.setdefault(
            CACHE_ATTR, {}
        )
        if len(by_req) > 4 * len(req_ids) + 64:  # forget finished requests
            for gone in set(by_req) - set(req_ids):
                del by_req[gone]
        allowed = []
        for req_id in req_ids:
            params = getattr(self.requests.get(req_id), "sampling_params", None)
            cached = by_req.get(req_id)
            # Same id but another request object (ids can be client-chosen): parse again.
            if cached is None or cached[0] is not params:
                extra = getattr(params, "extra_args", None)
                parsed = resolve_allowed(extra, config.num_experts, config.default_allowed)
                cached = (params, parsed)
                by_req[req_id] = cached
            allowed.append(cached[1])
        counts = num_scheduled_tokens[: len(req_ids)]
        set_current_mask(build_token_mask(allowed, counts, config.num_experts))
        return original(self, scheduler_output, num_scheduled_tokens)

    _prepare_inputs._composer_hooked = True  # type: ignore[attr-defined]
    GPUModelRunner._prepare_inputs = _prepare_inputs  # type: ignore[method-assign]
