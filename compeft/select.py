"""Selection: the exact top-k of |τ| in bounded memory (spec/FORMAT.md section 7).

The global threshold is exact without ever concatenating the model: two passes of 16-bit
histograms over the float32 bit patterns of |τ| (non-negative float32 values order like their
bits), the second pass only inside the bucket that holds the target rank.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterable

import numpy as np

from .codec import select_kernels
from .errors import SourceError

HIST_BLOCKS = 8  # fixed, not the thread count, so sums are the same on every machine
NONFINITE_BUCKET = 0x7F80  # float32 bits >> 16 of +inf; NaNs lie above


@dataclass(frozen=True)
class Selection:
    """The outcome of selection over one scope: keep ``v != 0 and |v| >= threshold``."""

    threshold: float  # a float32 value
    sigma: float  # unbiased std of all entries (0 for fewer than two entries)


def target_rank(count: int, density: float) -> int:
    """d - floor(d * k), the reference ComPEFT rank (k = 1 keeps everything: rank 0)."""
    return count - math.floor(count * density)


def _bucket_of_rank(hist: np.ndarray, rank: int) -> tuple[int, int]:
    """The bucket holding the ``rank``-th smallest entry and the rank inside that bucket."""
    cumulative = np.cumsum(hist)
    bucket = int(np.searchsorted(cumulative, rank))  # first bucket with cumulative >= rank
    before = int(cumulative[bucket - 1]) if bucket else 0
    return bucket, rank - before


def select(tensors: Callable[[], Iterable[tuple[str, np.ndarray]]], density: float) -> Selection:
    """Exact threshold and std over every array that ``tensors()`` yields (it is called twice).

    Each yielded array is flat float32; only one is held at a time.
    """
    blocks = np.zeros((HIST_BLOCKS, 65536), dtype=np.int64)
    high = np.zeros(65536, dtype=np.int64)
    total = 0.0
    count = 0
    for name, values in tensors():
        own = np.zeros(65536, dtype=np.int64)
        total += select_kernels.histogram_high(values, own, blocks)
        if own[NONFINITE_BUCKET:].any():
            raise SourceError(f"tensor {name!r} holds NaN or infinite values; a task vector must be finite")
        high += own
        count += values.size
    rank = target_rank(count, density)
    mean = total / count if count else 0.0
    bucket = 0
    in_bucket = 0
    if rank > 0:
        bucket, in_bucket = _bucket_of_rank(high, rank)
    low = np.zeros(65536, dtype=np.int64)
    squares = 0.0
    for _, values in tensors():
        squares += select_kernels.histogram_low(values, np.uint32(bucket), mean, low, blocks)
    sigma = math.sqrt(squares / (count - 1)) if count > 1 else 0.0
    if rank == 0:
        return Selection(threshold=0.0, sigma=sigma)
    low_bucket, _ = _bucket_of_rank(low, in_bucket)
    bits = np.uint32((bucket << 16) | low_bucket)
    return Selection(threshold=float(bits.view(np.float32)), sigma=sigma)
