"""Router tuning maths (FlexOlmo's optional step): train only the MoE routers on mixed proxy text.

Independently trained experts each learned their router row against the public expert alone, so
in the composition nothing keeps an expert off the other owners' domains. With every expert,
attention and embedding weight frozen, only the MoE layers' router rows (and the FlexOlmo router
bias, when the model carries one) train on the language-model loss over all proxy samples mixed.
The experts never change. The driver (composer/train/router_tune.py) tokenises the proxy files,
loads the checkpoint and records the result.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from router_train.autocast import autocast
from router_train.batches import seeded_batches
from router_train.layers import decoder_layers
from router_train.loss import mean_nll

# The before/after loss is measured on each expert's first router.tune.loss_sequences proxy
# sequences (default LOSS_SEQUENCES): two full passes over a large proxy sample would cost as
# much as the tuning itself.
LOSS_SEQUENCES = 32


class RouterTuningDiverged(ValueError):
    """A training step's loss was not finite."""


@dataclass
class TunedRouters:
    rows: dict[int, torch.Tensor]  # MoE layer -> tuned router weight [E, hidden], float32
    bias: dict[int, torch.Tensor]  # MoE layer -> tuned router bias [E] (empty without bias)
    losses: list[float]  # training loss of every step
    loss_before: float  # mean LM loss on the loss sample (see loss_sample), before and after
    loss_after: float
    compute_dtype: torch.dtype = torch.float32  # the forward precision the caller chose


def loss_sample(sequences: dict[str, torch.Tensor], n: int = LOSS_SEQUENCES) -> torch.Tensor:
    """The sequences the recorded before/after loss is measured on: each expert's first ``n``,
    experts in order."""
    return torch.cat([s[:n] for s in sequences.values()])


def trainable_routers(model: nn.Module, moe_layers: list[int]) -> list[nn.Parameter]:
    """Freeze everything, then unfreeze each MoE layer's router weight and bias (a buffer that
    router_train.biased_router attached becomes a parameter)."""
    for p in model.parameters():
        p.requires_grad_(False)
    params: list[nn.Parameter] = []
    layers = decoder_layers(model)
    for i in moe_layers:
        gate = layers[i].mlp.gate
        gate.weight.requires_grad_(True)
        params.append(gate.weight)
        bias = getattr(gate, "router_bias", None)
        if bias is not None:
            gate.router_bias = nn.Parameter(bias.detach().clone())  # replaces the buffer
            params.append(gate.router_bias)
    return params


def tune_routers(
    model: nn.Module,
    moe_layers: list[int],
    sequences: dict[str, torch.Tensor],
    *,
    steps: int,
    lr: float,
    batch_size: int,
    loss_sequences: int,
    seed: int,
    compute_dtype: torch.dtype = torch.float32,
    progress: bool = True,
    round_to: torch.dtype = torch.float32,
) -> TunedRouters:
    """AdamW on the router rows and biases; batches drawn from a seeded permutation of every
    expert's proxy sequences together (re-shuffled each pass). ``model`` is changed in place.

    The tuned rows are rounded to ``round_to`` (the checkpoint's dtype) before the final loss, so
    ``loss_after`` is the loss of the weights that get written. A non-finite step loss raises
    :class:`RouterTuningDiverged`."""
    from tqdm.auto import tqdm

    data = torch.cat(list(sequences.values()))
    params = trainable_routers(model, moe_layers)
    model.eval()  # no dropout: the loss is the model's own
    loss_data = loss_sample(sequences, loss_sequences)
    loss_before = mean_nll(model, loss_data, batch_size, compute_dtype)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    losses: list[float] = []
    bar = tqdm(range(steps), desc="router tune", disable=not progress, leave=False)
    batches = seeded_batches(data.shape[0], batch_size, seed)
    for _ in bar:
        batch = data[next(batches)]
        with autocast(compute_dtype, model):
            out = model(input_ids=batch, labels=batch, use_cache=False)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step()
        losses.append(float(out.loss.detach()))
        if not math.isfinite(losses[-1]):
            raise RouterTuningDiverged(f"router tuning diverged (loss {losses[-1]})")
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
    layers = decoder_layers(model)
    with torch.no_grad():
        for i in moe_layers:
            w = layers[i].mlp.gate.weight
            w.copy_(w.to(round_to).float())
    loss_after = mean_nll(model, loss_data, batch_size, compute_dtype)
    rows = {i: layers[i].mlp.gate.weight.detach().float().clone() for i in moe_layers}
    bias = {
        i: layers[i].mlp.gate.router_bias.detach().float().clone()
        for i in moe_layers
        if getattr(layers[i].mlp.gate, "router_bias", None) is not None
    }
    return TunedRouters(rows, bias, losses, loss_before, loss_after, compute_dtype)
