"""Tensor work of merge builds: streamed dense merges, calibrated merges, MoE expert merging.

Training-free dense merges read one tensor from every input, merge it and hand it to the
ShardWriter, so memory stays near one tensor per input. Calibrated merges (Expert Merging) and
moe_merge need whole models (forward passes), so they read full state dicts.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from pydantic import BaseModel
from torch import Tensor

from composer import precision
from composer.checkpoint import Checkpoint, layer_of
from composer.errors import PlanError
from composer.recipe import TORCH_DTYPES
from composer.writer import ShardWriter, TensorSpec, partition
from merge.registry import CALIBRATED_METHODS, MOE_METHODS
from merge.routing_stats import collect_routing_stats
from merge.state_dict import merge_tensor

if TYPE_CHECKING:
    from composer.merging import MergePlan
    from composer.merging_params import CalibrationSettings, MergeSettings, MoeMergeSettings


def _bar(total: int, desc: str, enabled: bool) -> Any:
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="tensor", disable=not enabled, leave=False)


def check_expert_tensors(base: Checkpoint, experts: Sequence[Checkpoint], names: list[str]) -> None:
    """Every expert has exactly the base's tensors with the same shape and dtype (headers only);
    PlanError names the expert and the tensor."""
    ref = set(base.keys())
    for name, ck in zip(names, experts, strict=True):
        keys = set(ck.keys())
        if ref - keys:
            raise PlanError(f"expert '{name}' lacks tensor {sorted(ref - keys)[0]} of the base")
        if keys - ref:
            raise PlanError(f"expert '{name}' has tensor {sorted(keys - ref)[0]} the base lacks")
        for k in sorted(ref):
            (bd, bs), (ed, es) = base.meta(k), ck.meta(k)
            if es != bs:
                raise PlanError(
                    f"expert '{name}': tensor {k} has shape {list(es)}, the base has {list(bs)}"
                )
            if ed != bd:
                raise PlanError(f"expert '{name}': tensor {k} has dtype {ed}, the base has {bd}")


def _layout(
    metas: Iterable[tuple[str, torch.dtype, tuple[int, ...]]], out_dtype: torch.dtype
) -> list[list[TensorSpec]]:
    """Tensors grouped by layer (globals first), sorted by name inside a group: a fixed order."""
    groups: dict[int, list[TensorSpec]] = {}
    for name, dtype, shape in sorted(metas):
        dt = out_dtype if dtype.is_floating_point else dtype
        layer = layer_of(name)
        groups.setdefault(-1 if layer is None else layer, []).append(TensorSpec(name, shape, dt))
    return [groups[k] for k in sorted(groups)]


def _write(
    tmp: Path,
    groups: list[list[TensorSpec]],
    max_bytes: int,
    produce: Any,
    desc: str,
    progress: bool,
) -> dict[str, str]:
    writer = ShardWriter(tmp, partition(groups, max_bytes))
    with _bar(sum(len(g) for g in groups), desc, progress) as bar:
        for g in groups:
            for ts in g:
                writer.write(ts.name, produce(ts).to(ts.dtype).contiguous())
                bar.update(1)
    return writer.close()


# ------------------------------------------------------------------------------- dense merges


def run_dense(
    plan: MergePlan,
    base: Checkpoint,
    experts: Sequence[Checkpoint],
    names: list[str],
    method: str,
    params: BaseModel,
    tmp: Path,
    progress: bool,
) -> dict[str, str]:
    """A training-free merge, streamed: one tensor of every input in memory at a time."""
    out_dtype = TORCH_DTYPES[plan.dtype]
    groups = _layout(((k, *base.meta(k)) for k in sorted(base.keys())), out_dtype)  # noqa: SIM118

    # Weights every expert shares with the base bit for bit (FlexOlmo experts: all but the FFN)
    # merge to the base's under every method but an unnormalised linear sum; copying them skips
    # float rounding and keeps memory at one tensor (the comparison reads in small chunks).
    scales = method != "linear" or bool(getattr(params, "normalize", True))
    w = getattr(params, "weight", None)
    shortcut = scales or (w is None and len(experts) == 1) or (w is not None and sum(w) == 1.0)

    def produce(ts: TensorSpec) -> Tensor:
        b = base.read(ts.name)
        if shortcut and all(e.same_bytes(ts.name, base) for e in experts):
            return b
        return merge_tensor(method, ts.name, b, [e.read(ts.name) for e in experts], params, names)

    return _write(tmp, groups, plan.max_shard_bytes, produce, f"merge {method}", progress)


# ------------------------------------------------------------------------------- calibration


def calibration_batches(
    model_dir: Path, files: Sequence[Path], vocab_size: int, tokens: CalibrationSettings
) -> list[Tensor]:
    """Token-id batches [b, seq_len] from text files: the checkpoint's tokenizer, or UTF-8 bytes
    modulo the vocabulary for checkpoints without one (tiny test models)."""
    texts = [Path(f).read_text(errors="replace") for f in files]
    has_tok = any((model_dir / n).is_file() for n in ("tokenizer.json", "tokenizer_config.json"))
    ids: list[int] = []
    if has_tok:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(model_dir))
        for t in texts:
            ids.extend(tok(t, add_special_tokens=False)["input_ids"])
            if tok.eos_token_id is not None:
                ids.append(int(tok.eos_token_id))
    else:
        for t in texts:
            ids.extend(b % vocab_size for b in t.encode())
    ids = ids[: tokens.max_calibration_tokens]
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
    _, fn = CALIBRATED_METHODS[s.method]
    torch.manual_seed(0)  # nothing random should remain, but keep any kernel choice fixed
    compute_dtype = precision.choose(s.bf16, model)
    result = fn(model, base_sd, expert_sds, calibration, params, names, compute_dtype)
    del model, expert_sds
    merged = result.state_dict
    out_dtype = TORCH_DTYPES[plan.dtype]
    groups = _layout(((k, base_sd[k].dtype, tuple(base_sd[k].shape)) for k in base_sd), out_dtype)
    files = _write(
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


# ------------------------------------------------------------------------------- moe_merge


def _expert_names(config: dict[str, Any]) -> list[str]:
    n = int(config["num_local_experts"])
    names = config.get("composer_experts")
    return (
        list(names)
        if isinstance(names, list) and len(names) == n
        else [f"expert{i}" for i in range(n)]
    )


def run_moe_merge(
    plan: MergePlan,
    base: Checkpoint,
    s: MoeMergeSettings,
    params: BaseModel,
    tmp: Path,
    config: dict[str, Any],
    progress: bool,
) -> tuple[dict[str, str], dict[str, Any], dict[str, Any]]:
    """M-SMoE (or uniform averaging) of a Mixtral checkpoint down to ``num_experts``."""
    top_k = int(plan.base_config["num_experts_per_tok"])
    sd = _read_all(base)
    _, fn = MOE_METHODS[s.method]
    if s.method == "m_smoe":
        assert s.calibration is not None
        vocab = int(plan.base_config["vocab_size"])
        batches = calibration_batches(base.path, s.calibration, vocab, s.tokens)
        model = _load_model(base.path)
        stats = collect_routing_stats(model, batches, top_k)
        del model
        new_sd, groups = fn(sd, stats, params, top_k)
    else:
        stats = None
        new_sd, groups = fn(sd, params, top_k)
    del sd
    old_names = _expert_names(plan.base_config)
    n_out = int(params.num_experts)  # type: ignore[attr-defined]
    named = {li: [[old_names[e] for e in g] for g in gs] for li, gs in groups.items()}
    same = len({tuple(map(tuple, g)) for g in groups.values()}) == 1
    if same:
        new_names = ["+".join(g) for g in next(iter(named.values()))]
    else:
        new_names = [f"merged{j}" for j in range(n_out)]
    config.update(num_local_experts=n_out, composer_experts=new_names)
    config["composer_expert_groups"] = {str(li): g for li, g in sorted(named.items())}
    out_dtype = TORCH_DTYPES[plan.dtype]
    layout = _layout(((k, t.dtype, tuple(t.shape)) for k, t in new_sd.items()), out_dtype)
    files = _write(
        tmp, layout, plan.max_shard_bytes, lambda ts: new_sd[ts.name], s.method, progress
    )
    extra: dict[str, Any] = {
        "experts": [
            {
                "index": j,
                "name": new_names[j],
                "merged_from": {str(li): named[li][j] for li in named},
            }
            for j in range(n_out)
        ],
        "groups": {str(li): g for li, g in sorted(groups.items())},
    }
    if stats is not None:
        extra["frequency"] = {
            str(li): [round(float(x), 6) for x in st.frequency] for li, st in stats.items()
        }
    return files, config, extra
