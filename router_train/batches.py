"""Token-chunk batches: in order (evaluation, measurement) or seeded and endless (training).

Expert training and router tuning draw their batches the same way, so a seed pins both runs.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch


def as_chunks(token_chunks: torch.Tensor | Sequence[Sequence[int]]) -> torch.Tensor:
    """int64 [n, seq_len] from a tensor or nested lists; anything not 2-D is an error."""
    t = torch.as_tensor(token_chunks, dtype=torch.long)
    if t.ndim != 2:
        raise ValueError("token_chunks must be 2-D [n, seq_len]")
    return t


def in_order(chunks: torch.Tensor, batch_size: int) -> Iterator[torch.Tensor]:
    """Consecutive batches of ``batch_size`` chunks (the last may be shorter)."""
    for i in range(0, chunks.shape[0], batch_size):
        yield chunks[i : i + batch_size]


def seeded_batches(n: int, batch_size: int, seed: int) -> Iterator[list[int]]:
    """Endless batches of indices into ``n`` items, drawn from a seeded permutation that is
    re-drawn when used up (a batch may span two permutations)."""
    gen = torch.Generator().manual_seed(seed)
    order: list[int] = []
    while True:
        while len(order) < batch_size:
            order.extend(torch.randperm(n, generator=gen).tolist())
        yield order[:batch_size]
        order = order[batch_size:]
