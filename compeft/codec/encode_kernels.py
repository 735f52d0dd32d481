"""Numba kernels of the ternary-golomb encoder (spec/FORMAT.md 5.1-5.3): the exact stream sizes of
every candidate Golomb parameter, then the streams themselves. :mod:`compeft.codec.golomb` sizes
and allocates every array; the decoder's kernels are in :mod:`compeft.codec.kernels`.

A large tensor is encoded in blocks of its values, in parallel. Both passes see a block on its
own: the counting pass counts every gap but the one before the block's first kept entry (the
caller adds it from the blocks before), and the writing pass starts from the block's place in the
streams (its first entry's index, the position after the previous kept entry, its unary and high
bit offsets) and writes into words of its own, which the caller ORs into the streams. The result
is the same bytes as one serial pass over the whole tensor.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from .kernels import golomb_fields
from .select_kernels import is_kept
from .threads import serialized


@njit(cache=True, nogil=True)
def count_gaps(values, lo, hi, threshold, hist, long_gaps):
    """Count the kept entries of ``values[lo:hi]`` (float32) and the gaps between them.

    A gap g < ``hist.shape[0]`` adds 1 to ``hist[g]``; a longer one is appended to ``long_gaps``,
    which needs room for (hi - lo) // (hist.shape[0] + 1) of them (each spans more positions than
    that). The gap before the first kept entry is not counted: it depends on the values before
    ``lo``. Returns (nnz, index of the first kept entry or -1, index of the last or -1, long gaps).
    """
    short = hist.shape[0]
    nnz = 0
    first = -1
    nxt = 0
    n_long = 0
    for i in range(lo, hi):
        if is_kept(values[i], threshold):
            if first < 0:
                first = i
            else:
                gap = i - nxt
                if gap < short:
                    hist[gap] += 1
                else:
                    long_gaps[n_long] = gap
                    n_long += 1
            nxt = i + 1
            nnz += 1
    return nnz, first, nxt - 1, n_long


@serialized
@njit(cache=True, parallel=True, nogil=True)
def count_gaps_blocks(values, threshold, bounds, hists, long_gaps, ends):
    """:func:`count_gaps` of each block ``values[bounds[b]:bounds[b + 1]]`` into ``hists[b]`` and
    ``long_gaps[b]``; ``ends[b]`` receives its four results."""
    for b in prange(bounds.shape[0] - 1):
        nnz, first, last, n_long = count_gaps(values, bounds[b], bounds[b + 1], threshold, hists[b], long_gaps[b])
        ends[b, 0] = nnz
        ends[b, 1] = first
        ends[b, 2] = last
        ends[b, 3] = n_long


@njit(cache=True, nogil=True)
def gap_costs(hist, long_gaps, candidates, costs):
    """The exact stream sizes of the gaps :func:`count_gaps` counted, per candidate.

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


@njit(cache=True, nogil=True)
def encode_range(values, lo, hi, threshold, m, chunk_size, start, table, words, shifts):
    """Write the ternary-golomb streams of the kept entries of ``values[lo:hi]`` (float32).

    ``start`` (int64[4]): the index of the range's first kept entry in the tensor, the position
    after the kept entry before it (0 for none), and its unary and high bit offsets. Bit p of
    stream s (unary, low, high, signs) goes to ``words[s][(p >> 6) + shifts[s]]`` (uint64,
    zero-filled: the streams themselves with shifts 0, or a block's own words). ``table`` (int64[
    n_chunks, 3]) receives the rows of the chunks that start in the range: (base position, unary
    bit offset, high bit offset). Returns the end state: (entries, next position, unary bit
    offset, high bit offset) after the range.
    """
    qwords, lwords, hwords, swords = words
    qshift, lshift, hshift, sshift = shifts[0], shifts[1], shifts[2], shifts[3]
    b, width, cut, half = golomb_fields(m)
    e, nxt, qpos, hpos = start[0], start[1], start[2], start[3]
    for i in range(lo, hi):
        v = values[i]
        if not is_kept(v, threshold):
            continue
        if e % chunk_size == 0:
            c = e // chunk_size
            table[c, 0] = nxt
            table[c, 1] = qpos
            table[c, 2] = hpos
        gap = i - nxt
        nxt = i + 1
        q = gap // m
        r = gap - q * m
        qpos += q
        qwords[(qpos >> 6) + qshift] |= np.uint64(1) << np.uint64(qpos & 63)
        qpos += 1
        if b > 0:
            if r < cut:
                low = r
            else:
                j = r - cut
                low = cut + j % half
                if j >= half:
                    hwords[(hpos >> 6) + hshift] |= np.uint64(1) << np.uint64(hpos & 63)
                hpos += 1
            if width > 0:
                lpos = e * width
                off = lpos & 63
                lwords[(lpos >> 6) + lshift] |= np.uint64(low) << np.uint64(off)
                if off + width > 64:
                    lwords[(lpos >> 6) + 1 + lshift] |= np.uint64(low) >> np.uint64(64 - off)
        if v < 0:
            swords[(e >> 6) + sshift] |= np.uint64(1) << np.uint64(e & 63)
        e += 1
    return e, nxt, qpos, hpos


@njit(cache=True, nogil=True)
def encode_golomb(values, threshold, m, chunk_size, table, qwords, lwords, hwords, swords):
    """The whole of ``values`` (float32[n]) in one pass into the streams themselves (sized from
    :func:`gap_costs`). Returns (nnz, unary bits, high bits)."""
    start = np.zeros(4, np.int64)
    e, _, qpos, hpos = encode_range(values, 0, values.shape[0], threshold, m, chunk_size, start, table,
                                    (qwords, lwords, hwords, swords), np.zeros(4, np.int64))
    return e, qpos, hpos


@serialized
@njit(cache=True, parallel=True, nogil=True)
def encode_blocks(values, threshold, m, chunk_size, bounds, starts, table, words, shifts, ends):
    """:func:`encode_range` of each block ``values[bounds[b]:bounds[b + 1]]`` from ``starts[b]``
    with ``shifts[b]`` into ``words`` (each block's own), its end state into ``ends[b]``."""
    for b in prange(bounds.shape[0] - 1):
        e, nxt, qpos, hpos = encode_range(values, bounds[b], bounds[b + 1], threshold, m, chunk_size, starts[b],
                                          table, words, shifts[b])
        ends[b, 0] = e
        ends[b, 1] = nxt
        ends[b, 2] = qpos
        ends[b, 3] = hpos
