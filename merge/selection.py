"""The k largest magnitudes of a tensor in linear time, streamed over chunks.

TIES keeps the ``k = max(1, round(density * n))`` entries of largest magnitude of every task
vector. It used to sort them (``abs().topk(k)``, O(n log n) and 24 bytes per entry); this finds
the k-th largest magnitude ``t`` from a sample, refines it exactly in one counting pass, and keeps
``|x| >= t``. Only the magnitudes between two sample quantiles are held (about 2 % of n), so a
tensor can be streamed in row chunks read from disk.

Ties. When several entries share the magnitude ``t`` and only some of them fit in k, the old rule
kept the ones that torch's CPU ``topk`` picked: libstdc++'s introselect (``std::nth_element``,
or ``std::partial_sort`` when ``64 k <= n``) over (value, index) pairs, a deterministic function
of the whole tensor that is neither lowest nor highest index first. Nothing cheaper reproduces
it, so in that case (and only then) the entries are selected by ``topk(k, sorted=False)``: the
same introselect without the final sort of the kept entries, hence the same set bit for bit.
A tie at ``t == 0`` needs no such step: a zero entry trims to the same signed zero whether kept
or not. NaN magnitudes have no rank and are refused.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import Tensor

from merge.errors import MergeError

# A pass over the magnitudes: yields them as flat float32 chunks, in order, every time it is called.
Magnitudes = Callable[[], Iterable[Tensor]]

SAMPLE = 1 << 17  # sampled entries that place the bracket around the k-th largest
EXACT_BELOW = 1 << 16  # smaller tensors: kthvalue over all of them directly


def keep_count(n: int, density: float) -> int:
    """How many entries TIES keeps: round(density * n), at least one (Python's rounding)."""
    return max(1, round(density * n))


@dataclass(frozen=True)
class Selection:
    """The kept entries of one tensor: ``|x| >= threshold``, or ``mask`` where ties at the
    threshold had to be resolved the way ``topk`` resolves them."""

    threshold: float
    mask: Tensor | None = None  # flat bool over the whole tensor (tie case only)

    def keep(self, magnitudes: Tensor, start: int) -> Tensor:
        """Bool keep-mask of the chunk ``magnitudes`` (any shape) that starts at flat ``start``."""
        if self.mask is None:
            return magnitudes >= self.threshold
        return self.mask[start : start + magnitudes.numel()].view(magnitudes.shape)


def _refuse_nan(chunk: Tensor, what: str) -> None:
    if torch.isnan(chunk).any():
        raise MergeError(f"{what} has NaN entries; TIES cannot rank them by magnitude")


def _gather(magnitudes: Magnitudes, n: int, what: str) -> Tensor:
    """All n magnitudes in one flat tensor (filled in place: one copy in memory, not two)."""
    out: Tensor | None = None
    at = 0
    for c in magnitudes():
        c = c.reshape(-1)
        _refuse_nan(c, what)
        if out is None and c.numel() == n:
            return c
        if out is None:
            out = torch.empty(n, dtype=c.dtype)
        out[at : at + c.numel()] = c
        at += c.numel()
    if out is None or at != n:
        raise MergeError(f"{what}: read {at} magnitudes, expected {n}")
    return out


def _kth_largest_exact(flat: Tensor, k: int) -> float:
    return float(flat.kthvalue(flat.numel() - k + 1).values)


def _bracket(sample: Tensor, n: int, k: int) -> tuple[float | None, float | None]:
    """Sample values that enclose the k-th largest of n with overwhelming probability
    (6 standard deviations of the sample rank, plus slack for clustered row samples)."""
    s = sample.numel()
    r = k / n * s
    margin = 6.0 * math.sqrt(s * (k / n) * (1 - k / n)) + 16
    hi_rank, lo_rank = math.floor(r - margin), math.ceil(r + margin)  # 0-based, descending
    hi = float(sample.kthvalue(s - hi_rank).values) if hi_rank >= 0 else None
    lo = float(sample.kthvalue(s - lo_rank).values) if lo_rank < s else None
    return hi, lo


def kth_largest(
    magnitudes: Magnitudes, n: int, k: int, sample: Tensor, *, what: str
) -> tuple[float, int, int]:
    """(t, #(> t), #(== t)) for the k-th largest t of the n magnitudes, in one counting pass.

    ``sample`` is any subset of the magnitudes; it only places the bracket, so a poor sample
    costs a second, exact pass, never a wrong answer.
    """
    hi, lo = _bracket(sample, n, k)
    above = at_hi = at_lo = 0
    inside: list[Tensor] = []
    held, cap = 0, max(1 << 20, n // 8)
    for c in magnitudes():
        c = c.reshape(-1)
        _refuse_nan(c, what)
        sel = torch.ones_like(c, dtype=torch.bool)
        if hi is not None:
            above += int((c > hi).sum())
            at_hi += int((c == hi).sum())
            sel &= c < hi
        if lo is not None:
            sel &= c > lo
            if lo != hi:
                at_lo += int((c == lo).sum())
        part = c[sel]
        held += part.numel()
        if held > cap:  # the sample was far off: rank every magnitude instead
            return _exact_counts(_gather(magnitudes, n, what), k)
        inside.append(part)
    mid = torch.cat(inside) if inside else torch.empty(0)
    rank = k - above  # rank of t among the magnitudes <= hi
    if rank <= 0:
        return _exact_counts(_gather(magnitudes, n, what), k)
    if hi is not None and rank <= at_hi:
        return hi, above, at_hi
    rank -= at_hi if hi is not None else 0
    if rank <= mid.numel():
        t = _kth_largest_exact(mid, rank)
        gt = above + (at_hi if hi is not None else 0) + int((mid > t).sum())
        return t, gt, int((mid == t).sum())
    rank -= mid.numel()
    if lo is not None and lo != hi and rank <= at_lo:
        return lo, above + at_hi + mid.numel(), at_lo
    return _exact_counts(_gather(magnitudes, n, what), k)


def _exact_counts(flat: Tensor, k: int) -> tuple[float, int, int]:
    t = _kth_largest_exact(flat, k)
    return t, int((flat > t).sum()), int((flat == t).sum())


def select_top(
    magnitudes: Magnitudes, n: int, k: int, sample: Tensor | None = None, *, what: str = "tensor"
) -> Selection:
    """The k largest of n magnitudes (non-negative floats), as the old ``topk`` rule keeps them.

    ``magnitudes`` is called once or twice (three times when ties straddle the threshold);
    ``sample`` defaults to all magnitudes for small tensors.
    """
    if not 1 <= k <= n:
        raise MergeError(f"{what}: cannot keep {k} of {n} entries")
    if n <= EXACT_BELOW or sample is None:
        flat = _gather(magnitudes, n, what)
        t, gt, eq = _exact_counts(flat, k)
    else:
        flat = None
        t, gt, eq = kth_largest(magnitudes, n, k, sample, what=what)
    if gt + eq == k or t == 0.0:
        return Selection(t)
    # Ties straddle the threshold: only topk's own introselect reproduces which ones it keeps.
    flat = flat if flat is not None else _gather(magnitudes, n, what)
    mask = torch.zeros(n, dtype=torch.bool)
    mask[flat.topk(k, sorted=False).indices] = True
    return Selection(t, mask)


def top_magnitude_mask(x: Tensor, density: float, *, what: str = "tensor") -> Tensor:
    """Bool mask of the ``keep_count(n, density)`` entries of ``x`` of largest magnitude.

    Equal to the old ``x.abs().topk(k)`` rule except at ties of magnitude 0 (where the trimmed
    values are equal anyway) and for NaN, which is refused.
    """
    mags = x.detach().float().abs().reshape(-1)
    n = mags.numel()
    k = keep_count(n, density)
    sample = mags[_sample_positions(n)] if n > EXACT_BELOW else None
    sel = select_top(lambda: [mags], n, k, sample, what=what)
    return sel.keep(mags, 0).view(x.shape)


def _sample_positions(n: int) -> Tensor:
    """A fixed pseudo-random sample of flat positions (same tensor size, same sample)."""
    gen = torch.Generator().manual_seed(n)
    return torch.randint(0, n, (min(SAMPLE, n),), generator=gen)


def sample_windows(nrows: int, row_elems: int, windows: int = 16) -> list[tuple[int, int]]:
    """Row ranges [a, b) that hold about SAMPLE entries (a sixteenth of the tensor at most),
    in ``windows`` pieces spread over the tensor: few reads, yet not one region's values."""
    n = nrows * row_elems
    want_rows = min(nrows, max(windows, math.ceil(min(SAMPLE, n // 16) / max(1, row_elems))))
    per = max(1, want_rows // windows)
    count = min(windows, nrows // per)
    stride = nrows // count
    gen = torch.Generator().manual_seed(nrows * 1_000_003 + row_elems)
    starts = [i * stride + int(torch.randint(0, stride - per + 1, (1,), generator=gen))
              for i in range(count)]  # fmt: skip
    return [(a, a + per) for a in starts]
