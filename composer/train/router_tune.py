"""Router tuning inside a build (FlexOlmo's optional step, spec field ``router.tune``): the driver.

The owners contribute a small proxy sample of their text; this reads and tokenises it, loads the
checkpoint the build has just written in its temporary folder (float32, router bias applied),
runs router_train.tune on it and keeps what composition.json records. The build writes the tuned
rows back into the same shards (composer.build), so the output is one standard checkpoint.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import torch

from composer import precision
from composer.errors import BuildError
from composer.spec import RouterTuneSpec
from composer.text import Tokenizer, load_token_chunks, load_tokenizer
from router_train.biased_router import load_composed
from router_train.tune import RouterTuningDiverged, TunedRouters, tune_routers


@dataclass
class TuneResult(TunedRouters):
    sequences: dict[str, torch.Tensor] = field(default_factory=dict)  # expert -> proxy tokens

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
    torch.manual_seed(seed)
    tokenizer = load_tokenizer(model_dir, "bytes" if cfg.tokenizer == "bytes" else None)
    sequences = proxy_sequences(proxy, tokenizer, cfg.seq_len, cfg.max_chunks, seed)
    model = load_composed(model_dir, torch.float32)
    try:
        tuned = tune_routers(
            model,
            moe_layers,
            sequences,
            steps=cfg.steps,
            lr=cfg.lr,
            batch_size=cfg.batch_size,
            loss_sequences=cfg.loss_sequences,
            seed=seed,
            compute_dtype=precision.choose(cfg.bf16, model),
            progress=progress,
            round_to=round_to,
        )
    except RouterTuningDiverged as e:
        raise BuildError(f"{e}; lower router.tune.lr") from None
    return TuneResult(**vars(tuned), sequences=sequences)
