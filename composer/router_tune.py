"""Router tuning on proxy text (FlexOlmo's optional step, spec field ``router.tune``).

Independently trained experts each learned their router row against the public expert alone, so
in the composition nothing keeps an expert off the other owners' domains. Here the owners
contribute a small proxy sample of their text; with every expert, attention and embedding weight
frozen, only the MoE layers' router rows (and the FlexOlmo router bias, when the build keeps one)
train on the language-model loss over all proxy samples mixed. The experts never change.

The build runs this on the checkpoint it has just written in its temporary folder and writes the
tuned rows back into the same shards (composer.build), so the output is one standard checkpoint.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from composer import precision
from composer.errors import BuildError
from composer.expert_train import (
    Tokenizer,
    decoder_layers,
    load_token_chunks,
    load_tokenizer,
    mean_nll,
    seeded_batches,
)
from composer.spec import RouterTuneSpec


@dataclass
class TuneResult:
    rows: dict[int, torch.Tensor]  # MoE layer -> tuned router weight [E, hidden], float32
    bias: dict[int, torch.Tensor]  # MoE layer -> tuned router bias [E] (empty without bias)
    losses: list[float]  # training loss of every step
    loss_before: float  # mean LM loss on the loss sample (see loss_sample), before and after
    loss_after: float
    sequences: dict[str, torch.Tensor]  # expert -> the proxy token sequences used
    compute_dtype: torch.dtype = torch.float32  # the forward precision composer.precision chose

    def record(self, proxy: dict[str, list[Path]], loss_sequences: int) -> dict[str, object]:
        """What composition.json keeps: per expert the files found, the sequences used and the
        sha256 of their tokens (which pins the exact proxy data), and the losses."""
        return {
            "proxy": {
                name: {
                    "files": len(proxy[name]),
                    "sequences": int(seqs.shape[0]),
                    "tokens_sha256": hashlib.sha256(seqs.numpy().tobytes()).hexdigest(),
                }
                for name, seqs in self.sequences.items()
            },
            "loss_sequences_per_expert": loss_sequences,
            "compute_dtype": precision.dtype_name(self.compute_dtype),
            "loss_before": round(self.loss_before, 6),
            "loss_after": round(self.loss_after, 6),
            "first_step_loss": round(self.losses[0], 6),
            "last_step_loss": round(self.losses[-1], 6),
        }


def proxy_sequences(
    proxy: dict[str, list[Path]], tokenizer: Tokenizer, seq_len: int, max_chunks: int, seed: int
) -> dict[str, torch.Tensor]:
    """Each expert's proxy files packed into at most ``max_chunks`` sequences [n, seq_len]."""
    out: dict[str, torch.Tensor] = {}
    for name, files in proxy.items():
        try:
            chunks = load_token_chunks(
                files, tokenizer, seq_len, max_train_chunks=max_chunks, max_heldout_chunks=0,
                heldout_fraction=0.0, seed=seed,
            )  # fmt: skip
        except ValueError as e:
            raise BuildError(f"router.tune.proxy.{name}: {e}") from None
        out[name] = chunks.train
    return out


# The before/after loss is measured on each expert's first router.tune.loss_sequences proxy
# sequences (default LOSS_SEQUENCES): two full passes over a large proxy sample would cost as
# much as the tuning itself.
LOSS_SEQUENCES = 32


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
    cfg: RouterTuneSpec,
    seed: int,
    progress: bool = True,
    round_to: torch.dtype = torch.float32,
) -> TuneResult:
    """AdamW on the router rows and biases; batches drawn from a seeded permutation of every
    expert's proxy sequences together (re-shuffled each pass). ``model`` is changed in place.

    The tuned rows are rounded to ``round_to`` (the checkpoint's dtype) before the final loss, so
    ``loss_after`` is the loss of the weights that get written."""
    from tqdm.auto import tqdm

    data = torch.cat(list(sequences.values()))
    params = trainable_routers(model, moe_layers)
    model.eval()  # no dropout: the loss is the model's own
    loss_data = loss_sample(sequences, cfg.loss_sequences)
    compute_dtype = precision.choose(cfg.bf16, model)
    loss_before = mean_nll(model, loss_data, cfg.batch_size, compute_dtype)
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    losses: list[float] = []
    bar = tqdm(range(cfg.steps), desc="router tune", disable=not progress, leave=False)
    batches = seeded_batches(data.shape[0], cfg.batch_size, seed)
    for _ in bar:
        batch = data[next(batches)]
        with precision.autocast(compute_dtype, model):
            out = model(input_ids=batch, labels=batch, use_cache=False)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step()
        losses.append(float(out.loss.detach()))
        if not math.isfinite(losses[-1]):
            raise BuildError(f"router tuning diverged (loss {losses[-1]}); lower router.tune.lr")
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
    layers = decoder_layers(model)
    with torch.no_grad():
        for i in moe_layers:
            w = layers[i].mlp.gate.weight
            w.copy_(w.to(round_to).float())
    loss_after = mean_nll(model, loss_data, cfg.batch_size, compute_dtype)
    rows = {i: layers[i].mlp.gate.weight.detach().float().clone() for i in moe_layers}
    bias = {
        i: layers[i].mlp.gate.router_bias.detach().float().clone()
        for i in moe_layers
        if getattr(layers[i].mlp.gate, "router_bias", None) is not None
    }
    return TuneResult(
        rows=rows,
        bias=bias,
        losses=losses,
        loss_before=loss_before,
        loss_after=loss_after,
        sequences=sequences,
        compute_dtype=compute_dtype,
    )


def tune_checkpoint(
    model_dir: Path,
    moe_layers: list[int],
    proxy: dict[str, list[Path]],
    cfg: RouterTuneSpec,
    seed: int,
    progress: bool = True,
    round_to: torch.dtype = torch.float32,
) -> TuneResult:
    """Load the checkpoint in ``model_dir`` (float32, router bias applied) and tune its routers."""
    from router_train.biased_router import load_composed

    torch.manual_seed(seed)
    tokenizer = load_tokenizer(model_dir, "bytes" if cfg.tokenizer == "bytes" else None)
    sequences = proxy_sequences(proxy, tokenizer, cfg.seq_len, cfg.max_chunks, seed)
    model = load_composed(model_dir, torch.float32)
    return tune_routers(model, moe_layers, sequences, cfg, seed, progress, round_to)
