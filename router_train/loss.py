"""The language-model loss a run is judged by: mean next-token NLL over token chunks.

Expert training reports it as held-out perplexity, router tuning as its before / after loss.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from router_train.autocast import autocast
from router_train.batches import as_chunks, in_order


@torch.no_grad()
def mean_nll(
    model: nn.Module,
    token_chunks: torch.Tensor | Sequence[Sequence[int]],
    batch_size: int = 8,
    compute_dtype: torch.dtype = torch.float32,
) -> float:
    """Mean next-token NLL over all predicted positions of the chunks, each scored independently
    (``compute_dtype`` bfloat16: autocast in the forward pass, see router_train.autocast); NaN
    when there is nothing to predict."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for batch in in_order(as_chunks(token_chunks), batch_size):
        with autocast(compute_dtype, model):
            logits = model(input_ids=batch, use_cache=False).logits[:, :-1].float()
        target = batch[:, 1:]
        nll = nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="sum"
        )
        total += float(nll)
        count += target.numel()
    model.train(was_training)
    return total / count if count else float("nan")
