"""moe_merge: M-SMoE (or uniform averaging) of a Mixtral checkpoint's experts, streamed one
MoE block at a time.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from pydantic import BaseModel

from composer.checkpoint import TORCH_DTYPES, Checkpoint
from composer.heap import trim_heap
from composer.merging import streaming
from composer.merging.calibrated import calibration_batches
from composer.merging.layerwise import layerwise_model
from composer.merging.streaming import RowReader, block_rows, group_tensors
from composer.progress import bar
from composer.tensor_jobs import LocalExecutor, OpenCheckpoint, TensorExecutor
from composer.writer import ShardFiles, TensorSpec, partition
from merge.errors import MergeError
from merge.m_smoe import check_output_count, merge_layer
from merge.methods import METHODS
from merge.moe_layer import Layout, MoELayer, moe_layer_prefixes, moe_layer_tensors, read_moe_layer
from merge.routing_stats import collect_routing_stats

if TYPE_CHECKING:
    from composer.merging.params import MoeMergeSettings
    from composer.merging.plan import MergePlan


def _expert_names(config: dict[str, Any]) -> list[str]:
    n = int(config["num_local_experts"])
    names = config.get("composer_experts")
    return (
        list(names)
        if isinstance(names, list) and len(names) == n
        else [f"expert{i}" for i in range(n)]
    )


def _copy_rows(files: ShardFiles, ck: Checkpoint, ts: TensorSpec) -> None:
    """Copy one tensor of ``ck`` into the output (as ``ts.dtype``), in blocks when large."""
    dtype, shape = ck.meta(ts.name)
    step = block_rows(shape, 1)
    rows = RowReader(ck, ts.name, dtype.itemsize * math.prod(shape) <= streaming.WHOLE_READ_BYTES)
    n = shape[0] if shape else 1
    for a in range(0, n, step):
        block = rows(a, min(a + step, n)).to(ts.dtype).contiguous()
        files.write_rows(ts.name, a, block if shape else block.reshape(()))


def _moe_block_keys(prefix: str) -> tuple[str, ...]:
    return (f"{prefix}.block_sparse_moe.", f"{prefix}.mlp.gate.", f"{prefix}.mlp.experts.")


def _merged_block_metas(
    base: Checkpoint, prefix: str, layout: Layout, n_out: int
) -> list[tuple[str, torch.dtype, tuple[int, ...]]]:
    """Names, dtypes and shapes of a block merged to ``n_out`` experts (from meta tensors)."""
    with torch.device("meta"):
        meta = {k: torch.empty(base.meta(k)[1], dtype=base.meta(k)[0]) for k in base
                if k.startswith(_moe_block_keys(prefix))}  # fmt: skip
        layer = read_moe_layer(meta, prefix, layout)
        out = MoELayer(layer.router[:n_out], layer.w1[:n_out], layer.w3[:n_out], layer.w2[:n_out])
        tensors = moe_layer_tensors(out, prefix, layout)
        return [(k, t.dtype, tuple(t.shape)) for k, t in tensors.items()]


@dataclass(frozen=True)
class LayerJob:
    """One MoE block to merge (picklable: a Ray task runs it as well; ``layer_fn`` carries the
    routing statistics, computed once on the driver)."""

    base: str
    prefix: str
    layout: Layout
    idx: int
    layer_fn: Any
    compress: Any
    dtypes: dict[str, torch.dtype]  # output tensor -> its dtype


def merge_moe_layer(
    job: LayerJob, open_checkpoint: OpenCheckpoint
) -> tuple[dict[str, torch.Tensor], list[list[int]]]:
    """One merged MoE block's output tensors (in the output dtype) and its expert groups."""
    layer = read_moe_layer(open_checkpoint(job.base), job.prefix, job.layout)
    merged = merge_layer(job.layer_fn, layer, job.idx, job.prefix, job.compress)
    del layer
    tensors = moe_layer_tensors(merged.layer, job.prefix, job.layout)
    out = {k: t.to(job.dtypes[k]).contiguous() for k, t in tensors.items()}
    return out, merged.groups


def run_moe_merge(
    plan: MergePlan,
    base: Checkpoint,
    s: MoeMergeSettings,
    params: BaseModel,
    tmp: Path,
    config: dict[str, Any],
    progress: bool,
    executor: TensorExecutor | None = None,
) -> tuple[dict[str, str], dict[str, Any], dict[str, Any]]:
    """M-SMoE (or uniform averaging) of a Mixtral checkpoint down to ``num_experts``.

    Streamed: routing statistics come from a model that holds one decoder layer at a time
    (composer.layerwise), then each MoE block is read, merged and written in turn, and every
    other tensor is copied in blocks; memory stays near one layer plus the embeddings. The
    blocks are jobs of ``executor`` (composer.tensor_jobs): here in turn, or Ray tasks.
    """
    top_k = int(plan.base_config["num_experts_per_tok"])
    n_out = int(params.num_experts)  # type: ignore[attr-defined]
    prefixes = moe_layer_prefixes(base)
    if not prefixes:
        raise MergeError("state dict has no Mixtral-style MoE block ('...layers.N...gate.weight')")
    check_output_count(n_out, top_k)
    stats = None
    if s.method == "m_smoe":
        assert s.calibration is not None
        vocab = int(plan.base_config["vocab_size"])
        batches = calibration_batches(base.path, s.calibration, vocab, s.tokens)
        with layerwise_model(base) as model:
            stats = collect_routing_stats(model.model, batches, top_k)
    make_layer_fn = METHODS[s.method].layer_fn
    assert make_layer_fn is not None  # every moe row has one
    layer_fn = make_layer_fn(params, stats)
    compress = getattr(params, "compress", None)

    in_blocks = tuple(k for p, _ in prefixes.values() for k in _moe_block_keys(p))
    copied = [k for k in sorted(base) if not k.startswith(in_blocks)]
    metas = [(k, *base.meta(k)) for k in copied]
    for p, layout in prefixes.values():
        metas += _merged_block_metas(base, p, layout, n_out)
    out_dtype = TORCH_DTYPES[plan.dtype]
    layout_groups = group_tensors(metas, out_dtype)
    spec_of = {ts.name: ts for g in layout_groups for ts in g}
    files = ShardFiles(tmp, partition(layout_groups, plan.max_shard_bytes))
    groups: dict[int, list[list[int]]] = {}
    try:
        with bar(len(spec_of), s.method, progress) as progress_bar:
            for name in copied:
                _copy_rows(files, base, spec_of[name])
                progress_bar.update(1)
            jobs = [
                LayerJob(str(base.path), prefix, layout, idx, layer_fn, compress,
                         {k: ts.dtype for k, ts in spec_of.items() if k.startswith(prefix + ".")})
                for idx, (prefix, layout) in prefixes.items()
            ]  # fmt: skip
            run = (executor or LocalExecutor()).map(merge_moe_layer, jobs, {str(base.path): base})
            for job, (tensors, layer_groups) in zip(jobs, run, strict=True):
                for name, t in tensors.items():
                    files.write_rows(name, 0, t)
                    progress_bar.update(1)
                groups[job.idx] = layer_groups
                del tensors
                trim_heap()
                files.hash_ready()
    except BaseException:
        files.abort()
        raise
    written = files.close()

    old_names = _expert_names(plan.base_config)
    named = {li: [[old_names[e] for e in g] for g in gs] for li, gs in groups.items()}
    same = len({tuple(map(tuple, g)) for g in groups.values()}) == 1
    if same:
        new_names = ["+".join(g) for g in next(iter(named.values()))]
    else:
        new_names = [f"merged{j}" for j in range(n_out)]
    config.update(num_local_experts=n_out, composer_experts=new_names)
    config["composer_expert_groups"] = {str(li): g for li, g in sorted(named.items())}
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
    return written, config, extra
