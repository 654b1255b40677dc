"""Owner-side FlexOlmo expert training: the driver of ``composer expert train``.

A data owner turns local text into a registrable FlexOlmo expert without sharing the text:

1. the owner's files are read and split into train and held-out files by a hash of each path
   (composer.train.data), tokenised with the public model's tokenizer and packed into ``seq_len``
   blocks (composer.text);
2. the domain embedding (mean FFN input per MoE layer) is measured on the PUBLIC model
   (router_train.domain_embedding);
3. in each chosen layer the MLP is replaced by a 2-expert MoE (router_train.PairFFN): the public FFN
   and router row frozen, a copy of the FFN + its router row + a negative bias trained; attention,
   norms and embeddings frozen (router_train.pair_train);
4. the artifact is written atomically (composer.train.artifact).

With ``lora_rank`` the owner's expert FFN is the public FFN plus a LoRA delta on its gate, up and
down projections (router_train.lora_ffn): only the factors, router row and bias train, and the
artifact is a PEFT adapter folder plus ``composer_expert.safetensors``
(composer.train.lora_artifact): a few MB instead of a full checkpoint.

Tiny test models have no tokenizer: pass ``tokenizer="bytes"`` (UTF-8 bytes as ids 0..255, needs a
vocabulary of at least 256) or pre-tokenised :class:`TokenChunks` instead of paths.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from composer import precision
from composer.precision import Bf16Setting
from composer.text import TokenChunks, Tokenizer, load_token_chunks, load_tokenizer
from composer.train.artifact import FORMAT_TAG, write_expert_artifact
from composer.train.evaluate import load_causal_lm, perplexity
from composer.train.lora_artifact import write_lora_artifact
from registry.checkpoint import inspect_folder
from registry.compat import BASE_FINGERPRINT_KEY
from router_train.domain_embedding import compute_domain_embeddings
from router_train.layers import decoder_layers, parse_layers
from router_train.lora_ffn import lora_factors_of
from router_train.pair_ffn import public_router_row
from router_train.pair_train import install_pair_ffns, train_pairs


class TrainConfig(BaseModel):
    """Hyper-parameters of one expert training run."""

    model_config = ConfigDict(extra="forbid")

    domain: str
    layers: list[int] | str | None = None
    steps: int = Field(200, ge=0)
    seq_len: int = Field(128, ge=2)
    batch_size: int = Field(8, ge=1)
    lr: float = Field(1e-4, gt=0)
    router_lr: float | None = Field(None, gt=0, description="default: 10 x lr")
    warmup_steps: int = Field(10, ge=0)
    grad_clip: float = Field(1.0, gt=0)
    seed: int = 0
    top_k: int = Field(2, ge=1, le=2)
    bias_margin: float = Field(0.0, description="extra negative offset of the initial bias")
    heldout_fraction: float = Field(0.1, ge=0, lt=1)
    max_heldout_chunks: int = Field(32, ge=0)
    embed_chunks: int = Field(32, ge=1, description="train chunks for the domain embedding")
    bf16: Bf16Setting = Field(
        "auto", description="bf16 autocast in the forward pass; auto: where bf16 is native"
    )
    num_threads: int | None = None
    lora_rank: int | None = Field(None, ge=1, description="train a LoRA expert of this rank")
    lora_alpha: float | None = Field(None, gt=0, description="LoRA alpha; default 2 x rank")

    @model_validator(mode="after")
    def _alpha_needs_rank(self) -> TrainConfig:
        if self.lora_alpha is not None and self.lora_rank is None:
            raise ValueError("lora_alpha (--alpha) needs lora_rank (--lora)")
        return self

    def lora(self) -> tuple[int, float] | None:
        """(rank, alpha) of a LoRA expert, None for a full FFN copy."""
        if self.lora_rank is None:
            return None
        return self.lora_rank, self.lora_alpha or 2.0 * self.lora_rank


@dataclass
class TrainResult:
    out_dir: Path
    losses: list[float]
    public_ppl: float
    expert_ppl: float  # the trained 2-expert model on the held-out chunks
    layers: list[int]
    train_chunks: int
    heldout_chunks: int
    wall_s: float
    train_s: float
    config: dict[str, Any] = field(default_factory=dict)

    @property
    def steps_per_s(self) -> float:
        return len(self.losses) / self.train_s if self.train_s > 0 else float("nan")


def train_expert(
    public_dir: str | Path,
    data_paths: Sequence[str | Path] | TokenChunks,
    out_dir: str | Path,
    *,
    domain: str,
    layers: Sequence[int] | str | None = None,
    steps: int = 200,
    seq_len: int = 128,
    batch_size: int = 8,
    lr: float = 1e-4,
    seed: int = 0,
    progress: bool = True,
    tokenizer: str | Tokenizer | None = None,
    overwrite: bool = False,
    **options: Any,
) -> TrainResult:
    """Train a FlexOlmo expert of ``public_dir`` on local data; write its artifact to ``out_dir``.

    ``data_paths``: files / folders / globs (tokenised with ``tokenizer``: None = the public
    model's, ``"bytes"`` = UTF-8 bytes) or pre-tokenised :class:`TokenChunks`. Further ``options``
    are the fields of :class:`TrainConfig` (router_lr, top_k, bias_margin, bf16, ...).
    """
    t0 = time.perf_counter()
    cfg = TrainConfig(
        domain=domain,
        layers=list(layers) if layers is not None and not isinstance(layers, str) else layers,
        steps=steps,
        seq_len=seq_len,
        batch_size=batch_size,
        lr=lr,
        seed=seed,
        **options,
    )
    public_dir, out_dir = Path(public_dir), Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise FileExistsError(f"{out_dir} exists (pass overwrite=True to replace it)")
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    torch.manual_seed(cfg.seed)

    if isinstance(data_paths, TokenChunks):
        data = data_paths
    else:
        tok = load_tokenizer(public_dir, tokenizer)
        data = load_token_chunks(
            data_paths,
            tok,
            cfg.seq_len,
            max_train_chunks=max(cfg.steps * cfg.batch_size, cfg.embed_chunks),
            max_heldout_chunks=cfg.max_heldout_chunks,
            heldout_fraction=cfg.heldout_fraction,
            seed=cfg.seed,
        )
    heldout = data.heldout[: cfg.max_heldout_chunks]

    model = load_causal_lm(public_dir)
    layer_ids = parse_layers(cfg.layers, len(decoder_layers(model)))
    public_ppl = (
        perplexity(model, heldout, cfg.batch_size, cfg.bf16) if len(heldout) else float("nan")
    )
    embeddings = compute_domain_embeddings(
        model, data.train[: cfg.embed_chunks], layer_ids, cfg.batch_size
    )
    lora = cfg.lora()
    pairs = install_pair_ffns(
        model, embeddings, top_k=cfg.top_k, bias_margin=cfg.bias_margin, lora=lora
    )

    t_train = time.perf_counter()
    losses = train_pairs(
        model,
        pairs,
        data.train,
        steps=cfg.steps,
        batch_size=cfg.batch_size,
        lr=cfg.lr,
        router_lr=cfg.router_lr,
        warmup_steps=cfg.warmup_steps,
        grad_clip=cfg.grad_clip,
        seed=cfg.seed,
        compute_dtype=precision.choose(cfg.bf16, model),
        desc=f"expert {cfg.domain}",
        progress=progress,
    )
    train_s = time.perf_counter() - t_train
    expert_ppl = (
        perplexity(model, heldout, cfg.batch_size, cfg.bf16) if len(heldout) else float("nan")
    )

    ffn_weights: dict[str, torch.Tensor] = {}
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    extras: dict[str, torch.Tensor] = {}
    for i, pair in pairs.items():
        if lora is None:
            for k, v in pair.expert_ffn.state_dict().items():
                ffn_weights[f"model.layers.{i}.mlp.{k}"] = v
        for proj, ab in lora_factors_of(pair.expert_ffn).items():
            factors[f"model.layers.{i}.mlp.{proj}"] = ab
        extras[f"model.layers.{i}.domain_embedding"] = embeddings[i]
        extras[f"model.layers.{i}.router_row"] = pair.expert_row.detach()
        extras[f"model.layers.{i}.router_bias"] = pair.expert_bias.detach()
        extras[f"model.layers.{i}.public_router_row"] = public_router_row(embeddings[i].numel())
    metadata = {
        "composer_format": FORMAT_TAG,
        "domain": domain,
        "layers": ",".join(str(i) for i in layer_ids),
        "top_k": str(cfg.top_k),
        "steps": str(cfg.steps),
        "seed": str(cfg.seed),
    }
    if lora is None:
        write_expert_artifact(
            public_dir, out_dir, ffn_weights, extras, metadata, overwrite=overwrite
        )
    else:
        # A LoRA carries no base weights: the base's fingerprint is what ties it to its base.
        fingerprint = inspect_folder(public_dir).fingerprint()
        metadata.update(expert_kind="lora", lora_rank=str(lora[0]), lora_alpha=repr(lora[1]))
        metadata[BASE_FINGERPRINT_KEY] = fingerprint
        write_lora_artifact(
            public_dir, out_dir, factors, *lora, extras, metadata, overwrite=overwrite
        )
    return TrainResult(
        out_dir=out_dir,
        losses=losses,
        public_ppl=public_ppl,
        expert_ppl=expert_ppl,
        layers=layer_ids,
        train_chunks=int(data.train.shape[0]),
        heldout_chunks=int(heldout.shape[0]),
        wall_s=time.perf_counter() - t0,
        train_s=train_s,
        config=cfg.model_dump(),
    )
