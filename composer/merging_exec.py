"""Tensor work of merge builds: streamed dense merges, calibrated merges, MoE expert merging.

Training-free dense merges read blocks of rows of one tensor from every input, merge them and
write them in place (ShardFiles), two tensors at a time, so memory stays near one block per
input and worker. Calibrated merges (Expert Merging) and
moe_merge need whole models (forward passes), so they read full state dicts.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from pydantic import BaseModel
from torch import Tensor

from composer import precision
from composer.checkpoint import Checkpoint
from composer.errors import PlanError
from composer.heap import trim_heap
from composer.layerwise import layerwise_model
from composer.recipe import TORCH_DTYPES
from composer.text import checkpoint_tokenizer, encode_texts, read_texts
from composer.writer import ShardFiles, ShardWriter, TensorSpec, partition
from merge.dense import TensorRows
from merge.errors import MergeError
from merge.m_smoe import check_output_count, merge_layer
from merge.moe_layer import Layout, MoELayer, moe_layer_prefixes, moe_layer_tensors, read_moe_layer
from merge.registry import CALIBRATED_METHODS, MOE_LAYER_METHODS
from merge.routing_stats import collect_routing_stats
from merge.state_dict import merge_rows
from registry.tensor_names import layer_of

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


# Rows of every input a block holds at once, as float32 entries summed over the inputs (8 MiB):
# a TIES block then holds about 6 stacked task-vector blocks of that size.
BLOCK_ENTRIES = 1 << 21
# Tensors up to this size (per input) are read whole, once; larger ones in blocks, again for
# every pass over them (TIES's selection reads a large tensor two or three times).
WHOLE_READ_BYTES = 8 << 20
WORKERS = 2  # the tensors are independent: one per core


def block_rows(shape: tuple[int, ...], inputs: int, block_entries: int | None = None) -> int:
    """Rows per block: about ``block_entries`` entries over all inputs, cut so that every block
    starts at a multiple of 64 entries (where torch's vectorised loops would start)."""
    rows = shape[0] if shape else 1
    row_elems = max(1, math.prod(shape[1:]) if shape else 1)
    per_input = max(1, (block_entries or BLOCK_ENTRIES) // max(1, inputs))
    n = per_input // row_elems
    if n >= rows:
        return max(1, rows)
    align = 64 // math.gcd(row_elems, 64)
    return min(rows, max(align, n - n % align))


class _Reader:
    """Rows of one input tensor: from a whole read when small, by positioned reads otherwise."""

    def __init__(self, ck: Checkpoint, name: str, whole: bool):
        self.ck, self.name, self.whole = ck, name, whole
        self._t: Tensor | None = None

    def __call__(self, a: int, b: int) -> Tensor:
        if not self.whole:
            return self.ck.read_rows(self.name, a, b)
        if self._t is None:  # on first use: linear never reads the base
            t = self.ck.read(self.name)
            self._t = t.reshape(1) if t.dim() == 0 else t
        return self._t[a:b]


@contextmanager
def _torch_threads(n: int) -> Iterator[None]:
    """Worker threads each take a core: torch's own intra-op threads would only contend."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def run_dense(
    plan: MergePlan,
    base: Checkpoint,
    experts: Sequence[Checkpoint],
    names: list[str],
    method: str,
    params: BaseModel,
    tmp: Path,
    progress: bool,
    *,
    workers: int = WORKERS,
    block_entries: int | None = None,
) -> dict[str, str]:
    """A training-free merge, streamed in blocks of rows written straight into place.

    Memory: per worker, one block of every input and the method's temporaries, plus whole
    copies of tensors up to WHOLE_READ_BYTES; TIES adds at most one bool per entry of a tensor
    whose threshold is tied (merge.selection). Workers take the tensors in file order, and
    the main thread hashes the files' completed prefixes meanwhile.
    """
    out_dtype = TORCH_DTYPES[plan.dtype]
    groups = _layout(((k, *base.meta(k)) for k in sorted(base.keys())), out_dtype)  # noqa: SIM118
    for ck in (base, *experts):
        ck.open_all()

    # Weights every expert shares with the base bit for bit (FlexOlmo experts: all but the FFN)
    # merge to the base's under every method but an unnormalised linear sum; copying them skips
    # float rounding and keeps memory at one block (the comparison reads in small chunks).
    scales = method != "linear" or bool(getattr(params, "normalize", True))
    w = getattr(params, "weight", None)
    shortcut = scales or (w is None and len(experts) == 1) or (w is not None and sum(w) == 1.0)
    inputs = 1 + len(experts)

    def merge_one(ts: TensorSpec) -> None:
        dtype, shape = base.meta(ts.name)
        whole = dtype.itemsize * math.prod(shape) <= WHOLE_READ_BYTES
        step = block_rows(shape, inputs, block_entries)
        b_rows = _Reader(base, ts.name, whole)
        if not dtype.is_floating_point or (
            shortcut and all(e.same_bytes(ts.name, base) for e in experts)
        ):
            rows = b_rows
        else:
            src = TensorRows(
                name=ts.name,
                shape=shape,
                dtype=dtype,
                base=b_rows,
                experts=tuple(_Reader(e, ts.name, whole) for e in experts),
                expert_names=tuple(names),
                block_rows=step,
            )
            rows = merge_rows(method, src, params)
        n = shape[0] if shape else 1
        for a in range(0, n, step):
            block = rows(a, min(a + step, n)).to(ts.dtype).contiguous()
            files.write_rows(ts.name, a, block if shape else block.reshape(()))

    # In file order (the embedding comes first, then layer after layer): the files' hashes then
    # follow the workers closely.
    specs = [ts for g in groups for ts in g]
    files = ShardFiles(tmp, partition(groups, plan.max_shard_bytes))
    try:
        with (
            _torch_threads(1 if workers > 1 else torch.get_num_threads()),
            ThreadPoolExecutor(max_workers=workers) as pool,
            _bar(len(specs), f"merge {method}", progress) as bar,
        ):
            futures = [pool.submit(merge_one, ts) for ts in specs]
            try:
                for f in as_completed(futures):
                    f.result()
                    trim_heap()  # the tensor's blocks are freed: keep RSS at what is in use
                    files.hash_ready()
                    bar.update(1)
            except BaseException:
                for f in futures:
                    f.cancel()
                raise
    except BaseException:
        files.abort()
        raise
    return files.close()


# ------------------------------------------------------------------------------- calibration


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


def _copy_rows(files: ShardFiles, ck: Checkpoint, ts: TensorSpec) -> None:
    """Copy one tensor of ``ck`` into the output (as ``ts.dtype``), in blocks when large."""
    dtype, shape = ck.meta(ts.name)
    step = block_rows(shape, 1)
    rows = _Reader(ck, ts.name, dtype.itemsize * math.prod(shape) <= WHOLE_READ_BYTES)
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


def run_moe_merge(
    plan: MergePlan,
    base: Checkpoint,
    s: MoeMergeSettings,
    params: BaseModel,
    tmp: Path,
    config: dict[str, Any],
    progress: bool,
) -> tuple[dict[str, str], dict[str, Any], dict[str, Any]]:
    """M-SMoE (or uniform averaging) of a Mixtral checkpoint down to ``num_experts``.

    Streamed: routing statistics come from a model that holds one decoder layer at a time
    (composer.layerwise), then each MoE block is read, merged and written in turn, and every
    other tensor is copied in blocks; memory stays near one layer plus the embeddings.
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
    layer_fn = MOE_LAYER_METHODS[s.method](params, stats)
    compress = getattr(params, "compress", None)

    in_blocks = tuple(k for p, _ in prefixes.values() for k in _moe_block_keys(p))
    copied = [k for k in sorted(base) if not k.startswith(in_blocks)]
    metas = [(k, *base.meta(k)) for k in copied]
    for p, layout in prefixes.values():
        metas += _merged_block_metas(base, p, layout, n_out)
    out_dtype = TORCH_DTYPES[plan.dtype]
    layout_groups = _layout(metas, out_dtype)
    spec_of = {ts.name: ts for g in layout_groups for ts in g}
    files = ShardFiles(tmp, partition(layout_groups, plan.max_shard_bytes))
    groups: dict[int, list[list[int]]] = {}
    try:
        with _bar(len(spec_of), s.method, progress) as bar:
            for name in copied:
                _copy_rows(files, base, spec_of[name])
                bar.update(1)
            for idx, (prefix, layout) in prefixes.items():
                layer = read_moe_layer(base, prefix, layout)
                merged = merge_layer(layer_fn, layer, idx, prefix, compress)
                del layer
                for name, t in moe_layer_tensors(merged.layer, prefix, layout).items():
                    files.write_rows(name, 0, t.to(spec_of[name].dtype).contiguous())
                    bar.update(1)
                groups[idx] = merged.groups
                del merged
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
