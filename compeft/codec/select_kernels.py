"""Numba kernels of entry selection: which entries a threshold keeps, the histograms that find the
exact k-th smallest |value|, and the statistics of what is kept (spec/FORMAT.md leaves the choice
to writers; these are the reference writer's).

Sums are split into a fixed number of blocks and added in block order, so every figure is the same
for every thread count. No ``fastmath``.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from .threads import serialized  # importing it pins a thread-safe threading layer (see threads.py)


@njit(cache=True, inline="always")
def is_kept(v, threshold):
    """Whether float32 ``v`` is kept at ``threshold``: ``v != 0 and |v| >= threshold`` (NaN never is)."""
    return v != 0.0 and abs(v) >= threshold


# ---------------------------------------------------------------------------------------------
# selection: exact k-th smallest |value| by two 16-bit histogram passes over float32 bit patterns


@serialized
@njit(cache=True, parallel=True, nogil=True)
def histogram_high(values, hist, blocks):
    """Add the histogram of the top 16 bits of |values| (float32[n]) into ``hist`` (int64[65536]).

    Returns (sum, count) of the values in float64 for the mean. ``blocks`` (int64[t, 65536]) is
    per-thread scratch.
    """
    n = values.shape[0]
    t = blocks.shape[0]
    sums = np.zeros(t, np.float64)
    step = (n + t - 1) // t
    for j in prange(t):
        blocks[j, :] = 0
        s = 0.0
        for i in range(j * step, min(n, (j + 1) * step)):
            v = values[i]
            s += v
            blocks[j, (np.float32(abs(v)).view(np.uint32) >> np.uint32(16))] += 1
        sums[j] = s
    total = 0.0
    for j in range(t):  # sequential on purpose: the same float sum for every thread count
        total += sums[j]
        for k in range(65536):
            hist[k] += blocks[j, k]
    return total


@serialized
@njit(cache=True, parallel=True, nogil=True)
def histogram_low(values, high, mean, hist, blocks):
    """Histogram the low 16 bits of |values| whose top 16 bits equal ``high`` into ``hist``.

    Returns the sum of squared deviations from ``mean`` in float64 (for the unbiased std).
    """
    n = values.shape[0]
    t = blocks.shape[0]
    sq = np.zeros(t, np.float64)
    step = (n + t - 1) // t
    for j in prange(t):
        blocks[j, :] = 0
        s = 0.0
        for i in range(j * step, min(n, (j + 1) * step)):
            v = values[i]
            dv = np.float64(v) - mean
            s += dv * dv
            bits = np.float32(abs(v)).view(np.uint32)
            if (bits >> np.uint32(16)) == high:
                blocks[j, bits & np.uint32(0xFFFF)] += 1
        sq[j] = s
    total = 0.0
    for j in range(t):  # sequential on purpose, as in histogram_high
        total += sq[j]
        for k in range(65536):
            hist[k] += blocks[j, k]
    return total


@serialized
@njit(cache=True, parallel=True, nogil=True)
def kept_stats(values, threshold, blocks):
    """(Σ v², Σ |v| over kept v, number kept) of float32[n] ``values`` in float64, kept meaning
    ``v != 0 and |v| >= threshold``. ``blocks`` fixes the split (its length), not the thread
    count, so the sums are the same on every machine."""
    n = values.shape[0]
    t = blocks
    squares = np.zeros(t, np.float64)
    kept_abs = np.zeros(t, np.float64)
    kept = np.zeros(t, np.int64)
    step = (n + t - 1) // t
    for j in prange(t):
        s = 0.0
        a = 0.0
        c = 0
        for i in range(j * step, min(n, (j + 1) * step)):
            v = values[i]
            s += np.float64(v) * np.float64(v)
            if is_kept(v, threshold):
                a += abs(np.float64(v))
                c += 1
        squares[j] = s
        kept_abs[j] = a
        kept[j] = c
    total_s = 0.0
    total_a = 0.0
    total_c = 0
    for j in range(t):  # sequential on purpose: the same float sums for every thread count
        total_s += squares[j]
        total_a += kept_abs[j]
        total_c += kept[j]
    return total_s, total_a, total_c


@serialized
@njit(cache=True, parallel=True, nogil=True)
def kept_signs(values, threshold, x, s):
    """``x`` = float64(values) and ``s`` = the kept entries' signs (±1.0; 0.0 elsewhere, -0.0
    where a dropped value is negative), float64[n] both: what ``np.sign(x) * kept`` gives, in one
    pass (the LoRA factors' Gram matrices are products of these)."""
    n = values.shape[0]
    blocks = 64
    for j in prange(blocks):
        for i in range(n * j // blocks, n * (j + 1) // blocks):
            v = values[i]
            x[i] = np.float64(v)
            if is_kept(v, threshold):
                s[i] = 1.0 if v > 0 else -1.0
            else:
                s[i] = -0.0 if v < 0 else 0.0
