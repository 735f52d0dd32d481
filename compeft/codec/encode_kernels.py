"""Numba kernels of the ternary-golomb encoder (spec/FORMAT.md 5.1-5.3): the exact stream sizes of
every candidate Golomb parameter, then the streams themselves. :mod:`compeft.codec.golomb` sizes
and allocates every array; the decoder's kernels are in :mod:`compeft.codec.kernels`.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from .kernels import golomb_fields
from .select_kernels import is_kept


@njit(cache=True)
def gap_histogram(values, threshold, hist, long_gaps):
    """One pass over ``values`` (float32[n]): count the kept entries and the gaps before them.

    A gap g < ``hist.shape[0]`` adds 1 to ``hist[g]``; a longer one is appended to ``long_gaps``,
    which needs room for n // (hist.shape[0] + 1) of them (each spans more positions than that).
    Returns (nnz, number of long gaps).
    """
    short = hist.shape[0]
    nnz = 0
    nxt = 0
    n_long = 0
    for i in range(values.shape[0]):
        if is_kept(values[i], threshold):
            gap = i - nxt
            nxt = i + 1
            nnz += 1
            if gap < short:
                hist[gap] += 1
            else:
                long_gaps[n_long] = gap
                n_long += 1
    return nnz, n_long


@njit(cache=True)
def gap_costs(hist, long_gaps, candidates, costs):
    """The exact stream sizes of the gaps :func:`gap_histogram` counted, per candidate.

    ``candidates`` (int64[c]) are Golomb parameters m >= 1; ``costs`` (int64[c, 2]) receives per
    candidate the unary bits (quotients + terminators) and the high bits (remainders in the long
    form); the low fields add nnz * max(b - 1, 0) bits.
    """
    for j in range(candidates.shape[0]):
        m = candidates[j]
        cut = golomb_fields(m)[2]  # m = 1: cut 1, and every remainder is 0
        unary = 0
        high = 0
        for gap in range(hist.shape[0]):
            count = hist[gap]
            if count:
                q = gap // m
                unary += count * (q + 1)
                if gap - q * m >= cut:
                    high += count
        for k in range(long_gaps.shape[0]):
            gap = long_gaps[k]
            q = gap // m
            unary += q + 1
            if gap - q * m >= cut:
                high += 1
        costs[j, 0] = unary
        costs[j, 1] = high


@njit(cache=True)
def encode_golomb(values, threshold, m, chunk_size, table, qwords, lwords, hwords, swords):
    """Write the ternary-golomb streams of ``values`` (float32[n]) kept at ``threshold``.

    ``table`` (int64[n_chunks, 3]) receives per chunk (base position, unary bit offset, high bit
    offset); ``qwords``, ``lwords``, ``hwords``, ``swords`` (uint64, zero-filled, sized from
    :func:`gap_costs`) receive the unary, low, high and sign streams.
    Returns (nnz, unary bits, high bits).
    """
    b, width, cut, half = golomb_fields(m)
    qpos = 0
    hpos = 0
    nnz = 0
    nxt = 0
    for i in range(values.shape[0]):
        v = values[i]
        if not is_kept(v, threshold):
            continue
        if nnz % chunk_size == 0:
            c = nnz // chunk_size
            table[c, 0] = nxt
            table[c, 1] = qpos
            table[c, 2] = hpos
        gap = i - nxt
        nxt = i + 1
        q = gap // m
        r = gap - q * m
        qpos += q
        qwords[qpos >> 6] |= np.uint64(1) << np.uint64(qpos & 63)
        qpos += 1
        if b > 0:
            if r < cut:
                low = r
            else:
                j = r - cut
                low = cut + j % half
                if j >= half:
                    hwords[hpos >> 6] |= np.uint64(1) << np.uint64(hpos & 63)
                hpos += 1
            if width > 0:
                lpos = nnz * width
                off = lpos & 63
                lwords[lpos >> 6] |= np.uint64(low) << np.uint64(off)
                if off + width > 64:
                    lwords[(lpos >> 6) + 1] |= np.uint64(low) >> np.uint64(64 - off)
        if v < 0:
            swords[nnz >> 6] |= np.uint64(1) << np.uint64(nnz & 63)
        nnz += 1
    return nnz, qpos, hpos
