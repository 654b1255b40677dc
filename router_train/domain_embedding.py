"""Domain embeddings: the mean FFN input (what the router sees) per layer, over a set of tokens.

FlexOlmo initialises each expert's router row from an embedding of its domain; here that embedding
is the mean, over the owner's sampled document tokens, of the hidden state entering each MoE layer's
FFN under the public model. Capturing it with forward pre-hooks works for any architecture whose
decoder layers call ``layer.mlp(hidden)`` (Llama: post-attention-layernorm output; OLMo-2: the
residual stream).
"""

from __future__ import annotations

from collections.abc import Mapping
from types import TracebackType

import torch
from torch import nn


class FfnInputMeans:
    """Context manager accumulating the mean input of each given module (float64 sums).

    ``token_mask`` (optional, set per batch with :meth:`set_mask`) selects which positions count;
    by default every position of every batch counts.
    """

    def __init__(self, modules: Mapping[int, nn.Module]) -> None:
        self._modules = dict(modules)
        self._sums: dict[int, torch.Tensor] = {}
        self._counts: dict[int, int] = dict.fromkeys(self._modules, 0)
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._mask: torch.Tensor | None = None

    def set_mask(self, mask: torch.Tensor | None) -> None:
        """Bool [batch, seq] mask of the positions to count in the next forward passes."""
        self._mask = mask

    def _hook(self, layer: int):  # noqa: ANN202 - torch hook signature
        def hook(_module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            x = args[0].detach().to(torch.float64)
            flat = x[self._mask] if self._mask is not None else x.reshape(-1, x.shape[-1])
            s = flat.sum(dim=0)
            self._sums[layer] = self._sums[layer] + s if layer in self._sums else s
            self._counts[layer] += flat.shape[0]

        return hook

    def __enter__(self) -> FfnInputMeans:
        for layer, module in self._modules.items():
            self._handles.append(module.register_forward_pre_hook(self._hook(layer)))
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def means(self) -> dict[int, torch.Tensor]:
        """float32 [hidden] mean per layer; raises if a layer saw no tokens."""
        out: dict[int, torch.Tensor] = {}
        for layer in self._modules:
            if self._counts[layer] == 0:
                raise ValueError(f"layer {layer}: no tokens were seen")
            out[layer] = (self._sums[layer] / self._counts[layer]).to(torch.float32)
        return out
