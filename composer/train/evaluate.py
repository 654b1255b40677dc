"""Held-out perplexity of a model or checkpoint folder, at the precision composer.precision picks.

The loss itself is router_train.loss.mean_nll; this adds loading (a composed checkpoint with its
router bias) and the precision choice, which the demo, benchmarks and training report share.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from composer import precision
from composer.precision import Bf16Setting
from router_train.loss import mean_nll


def load_causal_lm(model_dir: str | Path) -> nn.Module:
    """Any HF causal LM checkpoint folder, float32, eval mode (a composed one with its router
    bias, see router_train/biased_router.py)."""
    from router_train.biased_router import load_composed

    return load_composed(model_dir, torch.float32)


def perplexity(
    model: str | Path | nn.Module,
    token_chunks: torch.Tensor | Sequence[Sequence[int]],
    batch_size: int = 8,
    bf16: Bf16Setting = "auto",
) -> float:
    """exp(mean next-token NLL) over all predicted positions of the chunks (dense or MoE, any HF
    causal LM; a path is loaded in float32). Each chunk is scored independently; ``bf16``
    picks the forward precision (auto: bf16 autocast only where it is native)."""
    m = load_causal_lm(model) if isinstance(model, str | Path) else model
    return math.exp(mean_nll(m, token_chunks, batch_size, precision.choose(bf16, m)))
