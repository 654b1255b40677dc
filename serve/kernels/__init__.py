"""Fused MoE kernels with masked routing: Triton on CUDA, the torch reference elsewhere.

``route`` turns router logits into top-k expert ids and weights (FlexOlmo or Mixtral semantics,
optional per-expert bias and per-token expert mask); ``fused_experts`` runs the grouped SwiGLU
experts on the routed tokens. ``backend="auto"`` picks Triton for CUDA tensors and the torch
reference otherwise; ``"triton"`` on CPU tensors needs ``TRITON_INTERPRET=1`` set before this
package's Triton modules are first imported (they are imported lazily for that reason).
"""

from __future__ import annotations

from typing import Literal

import torch

from serve.kernels.checks import check_expert_args, check_routing_args
from serve.kernels.reference import Variant, fused_experts_reference, route_reference

Backend = Literal["auto", "triton", "torch"]

__all__ = [
    "Backend",
    "Variant",
    "fused_experts",
    "fused_experts_reference",
    "route",
    "route_reference",
    "selected_backend",
    "triton_available",
]


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _use_triton(backend: Backend, tensor: torch.Tensor) -> bool:
    if backend not in ("auto", "triton", "torch"):
        raise ValueError(f"unknown backend {backend!r}")
    if backend == "auto":
        return tensor.is_cuda and triton_available()
    return backend == "triton"


def selected_backend(backend: Backend, tensor: torch.Tensor) -> Literal["triton", "torch"]:
    """Which implementation ``backend`` runs for ``tensor`` (``"auto"``: Triton on CUDA)."""
    return "triton" if _use_triton(backend, tensor) else "torch"


def route(
    router_logits: torch.Tensor,
    top_k: int,
    *,
    variant: Variant,
    bias: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    backend: Backend = "auto",
    check_mask: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Route tokens to experts: ``(topk_weights [T, k] float32, topk_ids [T, k] int32)``.

    ``mask`` is bool ``[T, E]``, True = allowed; a disallowed expert behaves as if it did not
    exist. ``flexolmo``: softmax over all allowed experts, then top-k, no renormalisation;
    ``mixtral``: top-k, then softmax over the chosen. Ties go to the lower expert index. Raises
    ``ValueError`` naming the row if any row allows fewer than ``top_k`` experts;
    ``check_mask=False`` skips that count (a host sync on CUDA) when the caller guarantees it
    (a short row would then get undefined ids and weights, ids possibly out of range).
    """
    if variant not in ("flexolmo", "mixtral"):
        raise ValueError(f"unknown routing variant {variant!r}")
    if not _use_triton(backend, router_logits):
        return route_reference(
            router_logits, top_k, variant=variant, bias=bias, mask=mask, check_mask=check_mask
        )
    check_routing_args(router_logits, top_k, bias, mask, count_allowed=check_mask)
    from serve.kernels.triton_routing import route_triton

    return route_triton(
        router_logits, top_k, softmax_over_chosen=variant == "mixtral", bias=bias, mask=mask
    )


def fused_experts(
    hidden: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    *,
    backend: Backend = "auto",
    check_ids: bool = True,
) -> torch.Tensor:
    """``out[t] = sum_k w[t,k] * W2_e (silu(G_e x_t) * (U_e x_t))``, ``e = topk_ids[t,k]``.

    vLLM fused-MoE layout: ``w13 [E, 2I, H]`` (gate rows, then up rows), ``w2 [E, H, I]``.
    Float32 accumulation; the result has hidden's dtype. ``check_ids=False`` skips the range
    check of the ids (a host sync), e.g. when they come straight from ``route``.
    """
    check_expert_args(hidden, w13, w2, topk_weights, topk_ids, check_ids=check_ids)
    if not _use_triton(backend, hidden):
        return fused_experts_reference(hidden, w13, w2, topk_weights, topk_ids)
    from serve.kernels.triton_experts import fused_experts_triton

    return fused_experts_triton(hidden, w13, w2, topk_weights, topk_ids)
