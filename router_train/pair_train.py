"""Training the owner's half of FlexOlmo expert pairs: install them, then AdamW on the new expert.

Every parameter of the public model stays frozen; in each chosen layer the MLP becomes a
router_train.pair_ffn.PairFFN whose expert FFN, router row and bias train. The driver
(composer/train/expert.py) reads the data, picks the precision and writes the artifact.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from router_train.autocast import autocast
from router_train.batches import seeded_batches
from router_train.layers import decoder_layers
from router_train.lora_ffn import lora_expert_ffn
from router_train.pair_ffn import PairFFN, init_router_from_domain_embedding


def install_pair_ffns(
    model: nn.Module,
    domain_embeddings: dict[int, torch.Tensor],
    *,
    top_k: int = 2,
    bias_margin: float = 0.0,
    lora: tuple[int, float] | None = None,
) -> dict[int, PairFFN]:
    """Replace ``layer.mlp`` by a PairFFN in every layer that has a domain embedding and freeze all
    parameters except each expert FFN, expert router row and bias.

    ``lora=(rank, alpha)``: the expert FFN is the public FFN (shared, frozen) plus LoRA factors on
    its gate/up/down projections (router_train.lora_ffn); only the factors train."""
    for p in model.parameters():
        p.requires_grad_(False)
    pairs: dict[int, PairFFN] = {}
    layers = decoder_layers(model)
    for i, emb in sorted(domain_embeddings.items()):
        row, bias = init_router_from_domain_embedding(emb, bias_margin)
        public = layers[i].mlp
        expert = lora_expert_ffn(public, *lora) if lora is not None else None
        pair = PairFFN(public, expert, expert_row=row, expert_bias=bias, top_k=top_k)
        for p in pair.trainable_parameters():
            p.requires_grad_(True)
        layers[i].mlp = pair
        pairs[i] = pair
    return pairs


def lr_factor(step: int, steps: int, warmup: int) -> float:
    """Linear warm-up, then cosine decay to 10 %."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))


def train_pairs(
    model: nn.Module,
    pairs: dict[int, PairFFN],
    train_chunks: torch.Tensor,
    *,
    steps: int,
    batch_size: int,
    lr: float,
    router_lr: float | None,
    warmup_steps: int,
    grad_clip: float,
    seed: int,
    compute_dtype: torch.dtype = torch.float32,
    desc: str = "expert",
    progress: bool = True,
) -> list[float]:
    """AdamW on the expert FFNs' own parameters (``lr``; a LoRA expert's factors only), rows and
    biases (``router_lr``, default 10 x ``lr``); batches drawn from a seeded permutation of the
    chunks (re-shuffled each epoch). Returns the loss of every step."""
    from tqdm.auto import tqdm

    ffn_params = [p for pr in pairs.values() for p in pr.expert_parameters()]
    router_params = [p for pr in pairs.values() for p in (pr.expert_row, pr.expert_bias)]
    base_lrs = [lr, router_lr or 10 * lr]
    opt = torch.optim.AdamW(
        [{"params": ffn_params, "lr": base_lrs[0]}, {"params": router_params, "lr": base_lrs[1]}],
        weight_decay=0.0,
    )
    batches = seeded_batches(train_chunks.shape[0], batch_size, seed)
    losses: list[float] = []
    model.train()
    bar = tqdm(range(steps), desc=desc, disable=not progress, leave=False)
    for step in bar:
        batch = train_chunks[next(batches)]
        for g, base in zip(opt.param_groups, base_lrs, strict=True):
            g["lr"] = base * lr_factor(step, steps, warmup_steps)
        with autocast(compute_dtype, model):
            out = model(input_ids=batch, labels=batch, use_cache=False)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(ffn_params + router_params, grad_clip)
        opt.step()
        losses.append(float(out.loss.detach()))
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
    model.eval()
    return losses
