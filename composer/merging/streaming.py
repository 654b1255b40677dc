"""How merge builds lay out and stream tensors: output groups in a fixed order, blocks of rows
sized to a memory budget, readers that take rows from disk, and a progress-bar writer.

Shared by the dense, calibrated and moe_merge executors (composer.merging.dense, .calibrated,
.moe) so that all three write the same layout for the same tensors.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from composer.checkpoint import Checkpoint
from composer.progress import bar
from composer.writer import ShardWriter, TensorSpec, partition
from registry.tensor_names import layer_of

# Rows of every input a block holds at once, as float32 entries summed over the inputs (8 MiB):
# a TIES block then holds about 6 stacked task-vector blocks of that size.
BLOCK_ENTRIES = 1 << 21
# Tensors up to this size (per input) are read whole, once; larger ones in blocks, again for
# every pass over them (TIES's selection reads a large tensor two or three times).
WHOLE_READ_BYTES = 8 << 20
WORKERS = 2  # tensors (or adapted weights) are independent: one worker thread per core


@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Worker threads each take a core: torch's own intra-op threads would only contend."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


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


def group_tensors(
    metas: Iterable[tuple[str, torch.dtype, tuple[int, ...]]], out_dtype: torch.dtype
) -> list[list[TensorSpec]]:
    """Tensors grouped by layer (globals first), sorted by name inside a group: a fixed order."""
    groups: dict[int, list[TensorSpec]] = {}
    for name, dtype, shape in sorted(metas):
        dt = out_dtype if dtype.is_floating_point else dtype
        layer = layer_of(name)
        groups.setdefault(-1 if layer is None else layer, []).append(TensorSpec(name, shape, dt))
    return [groups[k] for k in sorted(groups)]


def write_all(
    tmp: Path,
    groups: list[list[TensorSpec]],
    max_bytes: int,
    produce: Any,
    desc: str,
    progress: bool,
) -> dict[str, str]:
    writer = ShardWriter(tmp, partition(groups, max_bytes))
    with bar(sum(len(g) for g in groups), desc, progress) as progress_bar:
        for g in groups:
            for ts in g:
                writer.write(ts.name, produce(ts).to(ts.dtype).contiguous())
                progress_bar.update(1)
    return writer.close()


class RowReader:
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
