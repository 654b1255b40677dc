"""Calibrated dense merges (Expert Merging, Expert Merging++): learn per-layer coefficients
on calibration text with forward passes of the whole model, then write the merged tensors.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from pydantic import BaseModel
from torch import Tensor

from composer import precision
from composer.checkpoint import TORCH_DTYPES, Checkpoint
from composer.errors import PlanError
from composer.merging.streaming import group_tensors, write_all
from composer.text import checkpoint_tokenizer, encode_texts, read_texts
from merge.methods import METHODS

if TYPE_CHECKING:
    from composer.merging.params import CalibrationSettings, MergeSettings
    from composer.merging.plan import MergePlan


def calibration_batches(
    model_dir: Path, files: Sequence[Path], vocab_size: int, tokens: CalibrationSettings
) -> list[Tensor]:
    """Token-id batches [b, seq_len] from text files: the checkpoint's tokenizer, or UTF-8 bytes
    modulo the vocabulary for checkpoints without one (tiny test models)."""
    tok = checkpoint_tokenizer(model_dir, vocab_size)
    ids = encode_texts(read_texts(files), tok, eos=True)[: tokens.max_calibration_tokens]
    n, L = len(ids) // tokens.seq_len, tokens.seq_len
    if n == 0:
        if len(ids) < 2:
            raise PlanError(f"parameters.calibration: {[str(f) for f in files]} hold no text")
        return [torch.tensor([ids], dtype=torch.long)]  # one short sequence
    chunks = torch.tensor(ids[: n * L], dtype=torch.long).view(n, L)
    return list(chunks.split(tokens.batch_size))


def _read_all(ck: Checkpoint) -> dict[str, Tensor]:
    return {k: ck.read(k) for k in sorted(ck.keys())}


def _load_model(path: Path) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()


def run_calibrated(
    plan: MergePlan,
    base: Checkpoint,
    experts: Sequence[Checkpoint],
    names: list[str],
    s: MergeSettings,
    params: BaseModel,
    tmp: Path,
    progress: bool,
) -> tuple[dict[str, str], dict[str, Any]]:
    """Expert Merging / Expert Merging++: learn coefficients on calibration text, then write."""
    assert s.calibration is not None
    vocab = int(plan.base_config["vocab_size"])
    calibration = [calibration_batches(base.path, f, vocab, s.tokens) for f in s.calibration]
    model = _load_model(base.path)
    base_sd = _read_all(base)
    expert_sds = [_read_all(e) for e in experts]
    fn = METHODS[s.method].fn
    torch.manual_seed(0)  # nothing random should remain, but keep any kernel choice fixed
    compute_dtype = precision.choose(s.bf16, model)
    result = fn(model, base_sd, expert_sds, calibration, params, names, compute_dtype)
    del model, expert_sds
    merged = result.state_dict
    out_dtype = TORCH_DTYPES[plan.dtype]
    groups = group_tensors(
        ((k, base_sd[k].dtype, tuple(base_sd[k].shape)) for k in base_sd), out_dtype
    )
    files = write_all(
        tmp, groups, plan.max_shard_bytes, lambda ts: merged[ts.name], s.method, progress
    )
    extra = {
        "initial_alignment": result.initial_alignment,
        "final_alignment": result.final_alignment,
        "steps": len(result.losses),
        "compute_dtype": precision.dtype_name(compute_dtype),
        "chunked_tensors": result.chunked,
        "mean_coefficients": {
            k: [round(float(x), 6) for x in (c if c.dim() == 1 else c.mean(1))]
            for k, c in sorted(result.coefficients.items())
        },
    }
    return files, extra
