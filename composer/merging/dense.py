"""Training-free dense merges (linear, task arithmetic, TIES, DARE), streamed.

Blocks of rows of one tensor are read from every input, merged and written in place
(ShardFiles), two tensors at a time, so memory stays near one block per input and worker.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from pydantic import BaseModel

from composer.checkpoint import TORCH_DTYPES, Checkpoint
from composer.heap import trim_heap
from composer.merging import streaming
from composer.merging.streaming import RowReader, block_rows, group_tensors
from composer.progress import bar
from composer.writer import ShardFiles, TensorSpec, partition
from merge.rows import TensorRows
from merge.state_dict import merge_rows

if TYPE_CHECKING:
    from composer.merging.plan import MergePlan

WORKERS = 2  # the tensors are independent: one per core


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
    groups = group_tensors(((k, *base.meta(k)) for k in sorted(base.keys())), out_dtype)  # noqa: SIM118
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
        whole = dtype.itemsize * math.prod(shape) <= streaming.WHOLE_READ_BYTES
        step = block_rows(shape, inputs, block_entries)
        b_rows = RowReader(base, ts.name, whole)
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
                experts=tuple(RowReader(e, ts.name, whole) for e in experts),
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
