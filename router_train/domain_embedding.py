"""Domain embeddings: the mean FFN input (what the router sees) per layer, over a set of tokens.

FlexOlmo initialises each expert's router row from an embedding of its domain; here that embedding
is the mean, over the owner's sampled document tokens, of the hidden state entering each MoE layer's
FFN under the public model. The inputs are captured with router_train.ffn_inputs (forward
pre-hooks), which works for any architecture whose decoder layers call ``layer.mlp(hidden)``
(Llama: post-attention-layernorm output; OLMo-2: the residual stream).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from router_train.batches import as_chunks, in_order
from router_train.ffn_inputs import FfnInputHooks
from router_train.layers import ffn_modules


class FfnInputMeans(FfnInputHooks):
    """Context manager accumulating the mean input of each given module (float64 sums).

    ``token_mask`` (optional, set per batch with :meth:`set_mask`) selects which positions count;
    by default every position of every batch counts.
    """

    def __init__(self, modules: Mapping[int, nn.Module]) -> None:
        self._layers = list(modules)
        self._sums: dict[int, torch.Tensor] = {}
        self._counts: dict[int, int] = dict.fromkeys(self._layers, 0)
        self._mask: torch.Tensor | None = None
        super().__init__(modules, self._add)

    def set_mask(self, mask: torch.Tensor | None) -> None:
        """Bool [batch, seq] mask of the positions to count in the next forward passes."""
        self._mask = mask

    def _add(self, layer: int, hidden: torch.Tensor) -> None:
        x = hidden.detach().to(torch.float64)
        flat = x[self._mask] if self._mask is not None else x.reshape(-1, x.shape[-1])
        s = flat.sum(dim=0)
        self._sums[layer] = self._sums[layer] + s if layer in self._sums else s
        self._counts[layer] += flat.shape[0]

    def means(self) -> dict[int, torch.Tensor]:
        """float32 [hidden] mean per layer; raises if a layer saw no tokens."""
        out: dict[int, torch.Tensor] = {}
        for layer in self._layers:
            if self._counts[layer] == 0:
                raise ValueError(f"layer {layer}: no tokens were seen")
            out[layer] = (self._sums[layer] / self._counts[layer]).to(torch.float32)
        return out


@torch.no_grad()
def compute_domain_embeddings(
    model: nn.Module,
    token_chunks: torch.Tensor | Sequence[Sequence[int]],
    layers: Sequence[int],
    batch_size: int = 8,
) -> dict[int, torch.Tensor]:
    """Mean FFN input per layer (float32 [hidden]) over every token of ``token_chunks``."""
    with FfnInputMeans(ffn_modules(model, layers)) as acc:
        for batch in in_order(as_chunks(token_chunks), batch_size):
            model(input_ids=batch, use_cache=False)
    return acc.means()
