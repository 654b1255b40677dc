"""The one FFN-input capture: forward pre-hooks that hand each FFN's input to a callback.

What a router sees is the hidden state entering the layer's FFN (Llama: post-attention-layernorm
output; OLMo-2: the residual stream). Two consumers read it: the domain embedding (a running mean,
router_train.domain_embedding) and the calibration pass of a build (every token's input,
composer.calibration). Both register their hooks through :class:`FfnInputHooks`, so they capture
the same tensors.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from types import TracebackType

import torch
from torch import nn

OnInput = Callable[[int, torch.Tensor], None]


class FfnInputHooks:
    """Context manager: while open, every forward of ``modules[layer]`` calls
    ``on_input(layer, x)`` with the module's first positional input ``x`` ([batch, seq, hidden],
    as the model computed it). Hooks are registered in the mapping's order and removed on exit."""

    def __init__(self, modules: Mapping[int, nn.Module], on_input: OnInput) -> None:
        self._modules = dict(modules)
        self._on_input = on_input
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def _hook(self, layer: int):  # noqa: ANN202 - torch hook signature
        def hook(_module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            self._on_input(layer, args[0])

        return hook

    def __enter__(self) -> FfnInputHooks:
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
