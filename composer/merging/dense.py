"""Training-free dense merges (linear, task arithmetic, TIES, DARE), streamed.

Blocks of rows of one tensor are read from every input, merged and written in place
(ShardFiles), two tensors at a time, so memory stays near one block per input and worker. On
Ray (composer.tensor_jobs), each tensor is one task computing the same blocks and returning
them joined; the driver writes them in file order.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from pydantic import BaseModel
from torch import Tensor

from composer.checkpoint import TORCH_DTYPES, Checkpoint
from composer.heap import trim_heap
from composer.merging import streaming
from composer.merging.streaming import WORKERS, RowReader, block_rows, group_tensors, torch_threads
from composer.progress import bar
from composer.tensor_jobs import OpenCheckpoint, TensorExecutor
from composer.writer import ShardFiles, TensorSpec, partition
from merge.rows import TensorRows
from merge.state_dict import merge_rows

if TYPE_CHECKING:
    from composer.merging.plan import MergePlan


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
    executor: TensorExecutor | None = None,
) -> dict[str, str]:
    """A training-free merge, streamed in blocks of rows written straight into place.

    Memory: per worker, one block of every input and the method's temporaries, plus whole
    copies of tensors up to WHOLE_READ_BYTES; TIES adds at most one bool per entry of a tensor
    whose threshold is tied (merge.selection). Workers take the tensors in file order, and
    the main thread hashes the files' completed prefixes meanwhile. With a remote ``executor``
    (Ray) each tensor is one task that returns it whole; the same blocks, the same bytes.
    """
    out_dtype = TORCH_DTYPES[plan.dtype]
    groups = group_tensors(((k, *base.meta(k)) for k in sorted(base.keys())), out_dtype)  # noqa: SIM118
    for ck in (base, *experts):
        ck.open_all()

    # Weights every expert shares with the base bit for bit (FlexOlmo experts: all but the FFN)
    # merge to the base's under every method but an unnormalised linear sum; copying them skips
    # float rounding and keeps memory at one block (the comparison reads in small chunks).
    scales = method != "linear" or bool(getattr(params, "normalize", True))
    w = getattr(params, "weight", None)
    shortcut = scales or (w is None and len(experts) == 1) or (w is not None and sum(w) == 1.0)

    def job(ts: TensorSpec) -> DenseJob:
        return DenseJob(
            ts, str(base.path), tuple(str(e.path) for e in experts), tuple(names), method,
            params, shortcut, block_entries,
        )  # fmt: skip

    specs = [ts for g in groups for ts in g]
    files = ShardFiles(tmp, partition(groups, plan.max_shard_bytes))
    if executor is not None and executor.remote:
        return _run_remote(executor, [job(ts) for ts in specs], files, method, progress)

    def open_local(path: str | Path) -> Checkpoint:
        return by_path[str(path)]

    by_path = {str(ck.path): ck for ck in (base, *experts)}

    def merge_one(ts: TensorSpec) -> None:
        for a, block in merged_blocks(job(ts), open_local):
            files.write_rows(ts.name, a, block)

    # In file order (the embedding comes first, then layer after layer): the files' hashes then
    # follow the workers closely.
    try:
        with (
            torch_threads(1 if workers > 1 else torch.get_num_threads()),
            ThreadPoolExecutor(max_workers=workers) as pool,
            bar(len(specs), f"merge {method}", progress) as progress_bar,
        ):
            futures = [pool.submit(merge_one, ts) for ts in specs]
            try:
                for f in as_completed(futures):
                    f.result()
                    trim_heap()  # the tensor's blocks are freed: keep RSS at what is in use
                    files.hash_ready()
                    progress_bar.update(1)
            except BaseException:
                for f in futures:
                    f.cancel()
                raise
    except BaseException:
        files.abort()
        raise
    return files.close()


@dataclass(frozen=True)
class DenseJob:
    """One output tensor of a dense merge (picklable: a Ray task runs it as well)."""

    ts: TensorSpec
    base: str  # checkpoint folders
    experts: tuple[str, ...]
    names: tuple[str, ...]
    method: str
    params: BaseModel
    shortcut: bool  # copy tensors every expert shares with the base bit for bit
    block_entries: int | None


def merged_blocks(job: DenseJob, open_checkpoint: OpenCheckpoint) -> Iterator[tuple[int, Tensor]]:
    """(first row, rows) of one merged output tensor, block by block, in the output dtype."""
    ts = job.ts
    base = open_checkpoint(job.base)
    experts = [open_checkpoint(p) for p in job.experts]
    dtype, shape = base.meta(ts.name)
    whole = dtype.itemsize * math.prod(shape) <= streaming.WHOLE_READ_BYTES
    step = block_rows(shape, 1 + len(experts), job.block_entries)
    b_rows = RowReader(base, ts.name, whole)
    if not dtype.is_floating_point or (
        job.shortcut and all(e.same_bytes(ts.name, base) for e in experts)
    ):
        rows = b_rows
    else:
        src = TensorRows(
            name=ts.name,
            shape=shape,
            dtype=dtype,
            base=b_rows,
            experts=tuple(RowReader(e, ts.name, whole) for e in experts),
            expert_names=job.names,
            block_rows=step,
        )
        rows = merge_rows(job.method, src, job.params)
    n = shape[0] if shape else 1
    for a in range(0, n, step):
        block = rows(a, min(a + step, n)).to(ts.dtype).contiguous()
        yield a, block if shape else block.reshape(())


def merged_tensor(job: DenseJob, open_checkpoint: OpenCheckpoint) -> Tensor:
    """The whole merged tensor (a Ray task's result): the same blocks, joined."""
    blocks = [b for _, b in merged_blocks(job, open_checkpoint)]
    return blocks[0] if len(blocks) == 1 else torch.cat(blocks)


def _run_remote(
    executor: TensorExecutor, jobs: list[DenseJob], files: ShardFiles, method: str, progress: bool
) -> dict[str, str]:
    """Whole merged tensors from the executor's tasks, written here in file order."""
    try:
        with bar(len(jobs), f"merge {method}", progress) as progress_bar:
            for job, t in zip(jobs, executor.map(merged_tensor, jobs), strict=True):
                files.write_rows(job.ts.name, 0, t)
                del t
                trim_heap()
                files.hash_ready()
                progress_bar.update(1)
    except BaseException:
        files.abort()
        raise
    return files.close()
