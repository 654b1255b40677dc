"""Run the served models' MoE layers through our kernels (serve/kernels) inside vLLM.

`COMPOSER_MOE_BACKEND` (read in the engine process when the model is built; `composer serve`
resolves it once at start, logs the choice and reports it in /health):

- ``auto`` (default): the fastest exact backend measured for the device type (`FASTEST`).
- ``composer``: every vLLM MoE runner of the model computes
  ``route(router_logits, top_k, variant, bias, mask)`` then ``fused_experts(hidden, w13, w2, ...)``
  from `serve.kernels`: Triton kernels on CUDA tensors, the torch reference elsewhere (CPU). The
  gates are vLLM's, unchanged; the layer's router bias and the step's per-token mask are passed
  to `route` (bool mask, True = allowed) instead of being added to the logits.
- ``vllm``: vLLM's own fused MoE, with bias and the additive mask added by the gates
  (`serve.masking.install_gate_masks`).

The hook is the smallest one that covers both architectures: each `MoERunner` (vLLM's Mixtral
block and the Transformers backend's fused FlexOlmo block both end in one) gets a subclass whose
`_apply_quant_method` — the step inside vLLM's MoE custom op that selects experts and runs the
expert kernel — calls ours. Everything around it (gate, custom-op boundary, output reduction)
stays vLLM's. Expert weights are the ones vLLM loaded into the runner's `RoutedExperts`
(`w13_weight [E, 2I, H]`, `w2_weight [E, H, I]`); vLLM's CPU experts repack them into a blocked
layout in `process_weights_after_loading`, so a copy of the loaded tensors is kept across that
step and put back if they changed (the repacked copy is released: one copy of the experts stays).

Tensor, data, expert and context parallelism, quantised experts, shared experts and LoRA are out
of scope: the composer backend refuses them at load with a message naming the switch.
"""

from __future__ import annotations

import os
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

import torch

from registry.tensor_names import layer_of
from serve import masking
from serve.kernels import Variant, fused_experts, route, selected_backend

BACKEND_ENV = "COMPOSER_MOE_BACKEND"
BACKENDS = ("composer", "vllm")

# The fastest exact backend per device type, from side-by-side measurements; ours becomes the
# default on a device only once a measurement shows it at least as fast. CPU: vLLM's fused MoE
# (`bench/serve_overhead.py --compare-backends`, docs/serving.md). CUDA: not measured yet
# (no CUDA vLLM on this project's GPU hosts), so vLLM's tuned kernels; docs/kernels.md.
FASTEST: dict[str, str] = {"cpu": "vllm", "cuda": "vllm"}


def moe_backend(device_type: str | None = None) -> tuple[str, str]:
    """(backend, why) for this process: `COMPOSER_MOE_BACKEND` if set to a backend, else the
    measured fastest for `device_type` (default: the device vLLM runs on here)."""
    value = os.environ.get(BACKEND_ENV, "").strip().lower() or "auto"
    if value in BACKENDS:
        return value, f"{BACKEND_ENV}={value}"
    if value != "auto":
        choices = ", ".join(("auto", *BACKENDS))
        raise ValueError(f"{BACKEND_ENV}={value!r}: expected one of {choices}")
    if device_type is None:
        from vllm.platforms import current_platform

        device_type = str(current_platform.device_type)
    backend = FASTEST.get(device_type, "vllm")
    return backend, f"auto: fastest measured on {device_type}"


class UnsupportedMoE(ValueError):
    """The model or engine configuration needs something the composer backend does not do."""


# --- per-step routing mask ------------------------------------------------------------------


@dataclass(frozen=True)
class StepMask:
    """The step's mask in the form `route` takes, for one (tokens, top_k, device).

    ``allowed`` [T, E] bool has at least top_k True per row. A request may allow fewer experts
    than top_k (the server only requires one); vLLM's additive mask then picks masked experts with
    weight exactly 0. Here those rows also allow their first missing masked experts (``fill``),
    whose logits are set to -inf: chosen last, weight exactly 0, the same result. Rows allowing
    no expert at all (an unreadable mask, which fails closed) allow every expert and get all
    weights zeroed (``dead``): their MoE output is 0.
    """

    allowed: torch.Tensor
    fill: torch.Tensor | None = None
    dead: torch.Tensor | None = None  # [T, 1] bool


def routing_mask(allowed: torch.Tensor, top_k: int) -> StepMask:
    """`StepMask` from a host bool mask [T, E] (True = allowed); tensors stay on its device."""
    counts = allowed.sum(dim=1)
    short = counts < top_k
    if not bool(short.any()):
        return StepMask(allowed)
    dead = counts == 0
    missing = (top_k - counts).clamp(min=0)
    masked = ~allowed
    rank = masked.to(torch.int32).cumsum(dim=1)  # 1 for the first masked expert, 2, ...
    fill = masked & (rank <= missing[:, None]) & (short & ~dead)[:, None]
    padded = allowed | fill | dead[:, None]
    return StepMask(
        padded, fill if bool(fill.any()) else None, dead[:, None] if bool(dead.any()) else None
    )


_step: tuple[Any, StepMask | None] = (None, None)


def step_mask(
    num_tokens: int, num_experts: int, top_k: int, device: torch.device
) -> StepMask | None:
    """The current step's mask (serve.masking) for a layer's router logits, cached per step.

    Built once on the host (where the per-token mask lives), then copied to the device once;
    every MoE layer of the step reuses it. Padding rows (a padded batch) are unmasked.
    """
    global _step
    additive = masking.current_mask()
    if additive is None:
        return None
    if additive.shape[-1] != num_experts:  # never route around a mask: fail closed
        raise RuntimeError(f"expert mask for {additive.shape[-1]} experts, layer has {num_experts}")
    key = (num_tokens, top_k, device)
    cached_for, cached = _step
    if cached_for is not None and cached_for[0] is additive and cached_for[1] == key:
        return cached
    allowed = additive.detach().to("cpu") == 0
    rows = allowed.shape[0]
    if rows < num_tokens:
        allowed = torch.cat([allowed, allowed.new_ones(num_tokens - rows, num_experts)])
    allowed = allowed[:num_tokens]
    host = routing_mask(allowed, top_k)
    result = StepMask(
        host.allowed.to(device),
        host.fill.to(device) if host.fill is not None else None,
        host.dead.to(device) if host.dead is not None else None,
    )
    _step = ((additive, key), result)
    return result


# --- the runner hook ------------------------------------------------------------------------


@dataclass(eq=False)
class ComposerMoE:
    """What one MoE layer needs to run through serve.kernels, plus what the report shows."""

    name: str
    layer: int
    top_k: int
    variant: Variant
    bias: torch.Tensor | None
    masked: bool
    weights_ready: bool = False
    repacked: bool = False  # vLLM had repacked its copy at load; the plain one was put back
    calls: int = 0
    kernel: str = ""  # "triton" or "torch", as of the last call

    def forward(self, experts: Any, hidden: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        if not self.weights_ready:
            raise RuntimeError(
                f"{self.name}: expert weights were not post-processed through the composer hook"
            )
        self.calls += 1
        self.kernel = selected_backend("auto", hidden)
        bias = self.bias
        if bias is not None and bias.device != logits.device:
            bias = self.bias = bias.to(logits.device)
        sm = step_mask(*logits.shape, self.top_k, logits.device) if self.masked else None
        mask = None
        if sm is not None:
            mask = sm.allowed
            if sm.fill is not None:
                logits = logits.masked_fill(sm.fill, float("-inf"))
        weights, ids = route(
            logits, self.top_k, variant=self.variant, bias=bias, mask=mask, check_mask=False
        )
        if sm is not None and sm.dead is not None:
            weights = weights.masked_fill(sm.dead, 0.0)
        return fused_experts(
            hidden, experts.w13_weight, experts.w2_weight, weights, ids, check_ids=False
        )


_RUNNER_CLASSES: dict[type, type] = {}


def _composer_runner_class(base: type) -> type:
    if base not in _RUNNER_CLASSES:

        def _apply_quant_method(
            self: Any,
            hidden_states: torch.Tensor,
            router_logits: torch.Tensor,
            shared_experts_input: torch.Tensor | None,
            input_ids: torch.Tensor | None = None,
            shared_experts_overlapping: bool = False,
        ) -> tuple[None, torch.Tensor]:
            # (shared expert output, routed output); install refuses shared experts.
            return None, self._composer.forward(self.routed_experts, hidden_states, router_logits)

        _RUNNER_CLASSES[base] = type(
            f"Composer{base.__name__}", (base,), {"_apply_quant_method": _apply_quant_method}
        )
    return _RUNNER_CLASSES[base]


def _unsupported(runner: Any) -> str | None:
    """What in this runner the composer backend cannot run, or None."""
    from vllm.model_executor.layers.fused_moe import MoEActivation, UnquantizedFusedMoEMethod

    experts = runner.routed_experts
    mpc = experts.moe_config.moe_parallel_config
    checks = [
        (type(experts.quant_method) is not UnquantizedFusedMoEMethod, "quantised experts"),
        (
            max(mpc.tp_size, mpc.dp_size, mpc.ep_size, mpc.pcp_size) > 1 or mpc.use_ep,
            "tensor/data/expert/context parallelism",
        ),
        (experts.global_num_experts != experts.local_num_experts, "expert placement (EP/EPLB)"),
        (experts.activation != MoEActivation.SILU, f"activation {experts.activation}"),
        (experts.moe_config.has_bias, "expert biases"),
        (experts.moe_config.is_lora_enabled, "LoRA"),
        (experts.scoring_func != "softmax", f"scoring {experts.scoring_func!r}"),
        (experts.use_grouped_topk, "grouped top-k"),
        (experts.custom_routing_function is not None, "routing outside vLLM's runner"),
        (experts.e_score_correction_bias is not None, "score correction bias"),
        (
            experts.routed_scaling_factor != 1.0 or runner.routed_scaling_factor != 1.0,
            "routed scaling",
        ),
        (experts.apply_router_weight_on_input, "router weight on input"),
        (
            runner.shared_experts is not None or runner.shared_expert_gate is not None,
            "shared experts",
        ),
        (
            runner.routed_input_transform is not None or runner.routed_output_transform is not None,
            "routed input/output transforms",
        ),
    ]
    found = [what for bad, what in checks if bad]
    return ", ".join(found) if found else None


def _keep_plain_weights(experts: Any, state: ComposerMoE) -> None:
    """Wrap this layer's weight post-processing: keep the plain [E, 2I, H] / [E, H, I] tensors.

    vLLM's CPU experts replace `w13_weight`/`w2_weight` by prepacked copies (same shape, blocked
    memory layout); some CUDA backends shuffle them, a few in place; the Triton path leaves them
    as loaded. So a copy is taken before, and if the layer's tensors afterwards differ from it
    (other storage or other values) the copy is put back: the layer then holds one plain copy,
    which our kernels read (the converted one is released). Otherwise the copy is dropped.
    """
    from vllm.model_executor.utils import is_weights_pre_processed, replace_parameter

    method = experts.quant_method
    original = method.process_weights_after_loading

    def process_weights_after_loading(layer: Any) -> None:
        if is_weights_pre_processed():
            raise UnsupportedMoE(
                f"{state.name}: weights arrive pre-processed (vLLM's runtime layout); the "
                f"composer MoE backend needs them as loaded. Set {BACKEND_ENV}=vllm."
            )
        loaded = {
            name: getattr(layer, name).detach().clone() for name in ("w13_weight", "w2_weight")
        }
        original(layer)
        changed = False
        for name, plain in loaded.items():
            now = getattr(layer, name)
            same = (
                now.shape == plain.shape
                and now.stride() == plain.stride()
                and now.dtype == plain.dtype
                and torch.equal(now, plain)
            )
            changed = changed or not same
        if changed:
            for name, plain in loaded.items():
                replace_parameter(layer, name, plain)
        state.repacked = changed
        state.weights_ready = True

    method.process_weights_after_loading = process_weights_after_loading


def install_composer_moe(
    model: torch.nn.Module,
    vllm_config: Any,
    router_bias: dict[int, torch.Tensor] | None = None,
    dense_layers: Collection[int] = (),
) -> int:
    """Route every MoE runner of `model` through serve.kernels; returns how many.

    Call from the model's ``__init__`` (before weights load). `router_bias` (layer -> [E]) goes
    to `route` as its bias; the step's mask applies to every layer but `dense_layers`.
    Mixtral semantics (top-k, renormalise) where vLLM renormalises, else FlexOlmo's.
    """
    from vllm.model_executor.layers.fused_moe import MoERunner

    parallel = vllm_config.parallel_config
    sizes = {
        "tensor_parallel_size": parallel.tensor_parallel_size,
        "data_parallel_size": parallel.data_parallel_size,
    }
    if any(v > 1 for v in sizes.values()) or parallel.enable_expert_parallel:
        shown = ", ".join(f"{k}={v}" for k, v in sizes.items())
        raise UnsupportedMoE(
            f"the composer MoE backend runs each MoE layer whole on one device; tensor/expert "
            f"parallelism is out of scope ({shown}, enable_expert_parallel="
            f"{parallel.enable_expert_parallel}). Set {BACKEND_ENV}=vllm to use vLLM's fused MoE."
        )
    bias = router_bias or {}
    count = 0
    for name, module in model.named_modules():
        if not isinstance(module, MoERunner):
            continue
        problem = _unsupported(module)
        if problem:
            raise UnsupportedMoE(
                f"{name}: the composer MoE backend does not support {problem}. "
                f"Set {BACKEND_ENV}=vllm to use vLLM's fused MoE."
            )
        layer = layer_of(name)
        layer = -1 if layer is None else layer
        experts = module.routed_experts
        layer_bias = bias.get(layer)
        state = ComposerMoE(
            name=name,
            layer=layer,
            top_k=int(experts.top_k),
            variant="mixtral" if experts.renormalize else "flexolmo",
            bias=layer_bias.detach().to(torch.float32) if layer_bias is not None else None,
            masked=layer not in dense_layers,
        )
        module._composer = state  # type: ignore[attr-defined]
        module.__class__ = _composer_runner_class(type(module))
        _keep_plain_weights(experts, state)
        count += 1
    return count


def moe_backend_report(model: torch.nn.Module) -> dict[str, Any]:
    """Which backend each MoE layer of a loaded model runs, and how often ours ran.

    For tests and diagnostics, e.g. ``llm.apply_model(moe_backend_report)`` (needs
    ``VLLM_ALLOW_INSECURE_SERIALIZATION=1`` to send the function to the engine process).
    """
    from vllm.model_executor.layers.fused_moe import MoERunner

    layers = []
    for name, module in model.named_modules():
        if not isinstance(module, MoERunner):
            continue
        state: ComposerMoE | None = getattr(module, "_composer", None)
        entry: dict[str, Any] = {"name": name, "runner": type(module).__name__}
        if state is not None:
            entry |= {
                "backend": "composer",
                "calls": state.calls,
                "kernel": state.kernel,
                "variant": state.variant,
                "top_k": state.top_k,
                "masked": state.masked,
                "has_bias": state.bias is not None,
                "repacked": state.repacked,
            }
        else:
            entry["backend"] = "vllm"
        layers.append(entry)
    return {"backend": getattr(model, "composer_moe_backend", None), "layers": layers}
