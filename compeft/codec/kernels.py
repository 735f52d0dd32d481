"""Numba kernels of the ternary-golomb codec (spec/FORMAT.md, section "ternary-golomb").

Kernels see only contiguous numpy arrays and scalars; the caller allocates every output and has
validated every offset and length (see :mod:`compeft.codec.golomb`). Each kernel still stops at
the end of its inputs and outputs on its own and reports a status code instead of raising, because
Numba does not bounds-check and no Python object may cross the kernel boundary.

Bit streams are arrays of little-endian uint64 words; bit ``i`` of a stream is bit ``i % 64`` of
word ``i // 64``. No ``fastmath`` anywhere: decode is bit-exact by specification.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange
from numba.cpython.unsafe.numbers import trailing_zeros

# Status codes a decode kernel returns per chunk (0 = the chunk decoded and matched the table).
OK = 0
ERR_QUOTIENT_OVERRUN = 1  # the unary stream ended before the chunk's entries did
ERR_REMAINDER_OVERRUN = 2  # the remainder stream ended before the chunk's entries did
ERR_POSITION_RANGE = 3  # a position fell outside [chunk base, next chunk base) or the tensor
ERR_QUOTIENT_END = 4  # the chunk did not end exactly where the next one starts (unary stream)
ERR_REMAINDER_END = 5  # same, remainder stream
ERR_NEXT_BASE = 6  # the chunk's last position + 1 differs from the next chunk's base
ERR_BOUNDS = 7  # a table entry points outside the arrays it was given

STATUS_MESSAGES = {
    ERR_QUOTIENT_OVERRUN: "unary quotient stream ends inside a chunk",
    ERR_REMAINDER_OVERRUN: "remainder stream ends inside a chunk",
    ERR_POSITION_RANGE: "a decoded position lies outside its chunk or the tensor",
    ERR_QUOTIENT_END: "a chunk's unary bits do not end where the next chunk starts",
    ERR_REMAINDER_END: "a chunk's remainder bits do not end where the next chunk starts",
    ERR_NEXT_BASE: "a chunk's last position does not meet the next chunk's base",
    ERR_BOUNDS: "a chunk table entry points outside its stream",
}

# Output modes of the decode kernel.
MODE_CHECK = 0  # decode and validate only; write nothing
MODE_DENSE = 1  # zero-fill the chunk's range of ``out`` and write the value patterns
MODE_ADD_F32 = 2  # out (float32) += ±delta
MODE_ADD_BF16 = 3  # out (uint16 holding bfloat16) = bf16(f32(out) ± delta)
MODE_ADD_F16 = 4  # out (uint16 holding float16) = f16(f32(out) ± delta)
MODE_SCATTER = 5  # like MODE_DENSE into an output known to be zero: no zero-fill pass

F16_TO_F32 = np.arange(65536, dtype=np.uint32).astype(np.uint16).view(np.float16).astype(np.float32)


# ---------------------------------------------------------------------------------------------
# float helpers (numba has no float16 or bfloat16 type on the CPU)


@njit(cache=True, inline="always")
def bf16_bits_to_f32(h):
    """uint16 bfloat16 bits -> float32 (exact)."""
    return np.uint32(np.uint32(h) << np.uint32(16)).view(np.float32)


@njit(cache=True, inline="always")
def f32_to_bf16_bits(f):
    """float32 -> uint16 bfloat16 bits, round to nearest even (as torch); NaN stays a quiet NaN."""
    x = np.float32(f).view(np.uint32)
    if (x & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000):
        return np.uint16((x >> np.uint32(16)) | np.uint32(0x40))
    x = x + np.uint32(0x7FFF) + ((x >> np.uint32(16)) & np.uint32(1))
    return np.uint16(x >> np.uint32(16))


@njit(cache=True, inline="always")
def f32_to_f16_bits(f):
    """float32 -> uint16 float16 bits, round to nearest even (as numpy and torch)."""
    x = np.float32(f).view(np.uint32)
    sign = np.uint32((x >> np.uint32(16)) & np.uint32(0x8000))
    ax = x & np.uint32(0x7FFFFFFF)
    if ax >= np.uint32(0x7F800000):
        if ax > np.uint32(0x7F800000):
            return np.uint16(sign | np.uint32(0x7E00))
        return np.uint16(sign | np.uint32(0x7C00))
    if ax >= np.uint32(0x477FF000):  # >= 65520: rounds to infinity
        return np.uint16(sign | np.uint32(0x7C00))
    if ax < np.uint32(0x38800000):  # below 2**-14: a float16 subnormal (or zero)
        v = np.float64(np.uint32(ax).view(np.float32)) * 16777216.0  # exact: in units of 2**-24
        n = np.int64(np.floor(v))
        frac = v - n
        if frac > 0.5 or (frac == 0.5 and (n & 1) == 1):
            n += 1
        return np.uint16(sign | np.uint32(n))
    odd = (ax >> np.uint32(13)) & np.uint32(1)
    # Re-bias the exponent (127 -> 15) and add the rounding bias in one step.
    ax = ax + np.uint32(0xC8000FFF) + odd
    return np.uint16(sign | (ax >> np.uint32(13)))


# ---------------------------------------------------------------------------------------------
# encoding


@njit(cache=True, inline="always")
def _is_kept(v, threshold):
    return v != 0.0 and abs(v) >= threshold


@njit(cache=True)
def count_gap_costs(values, threshold, candidates, costs):
    """Count kept entries of ``values`` (float32[n]) and the exact bit cost of their gaps.

    ``candidates`` (int64[c]) are Golomb parameters m >= 1; ``costs`` (int64[c, 2]) receives per
    candidate the unary bits (quotients + terminators) and the remainder bits. Returns nnz.
    """
    nc = candidates.shape[0]
    bits = np.empty(nc, np.int64)
    cuts = np.empty(nc, np.int64)
    for j in range(nc):
        b = 0
        while (np.int64(1) << b) < candidates[j]:
            b += 1
        bits[j] = b
        cuts[j] = (np.int64(1) << b) - candidates[j]
        costs[j, 0] = 0
        costs[j, 1] = 0
    nnz = 0
    nxt = 0
    for i in range(values.shape[0]):
        if _is_kept(values[i], threshold):
            gap = i - nxt
            nxt = i + 1
            nnz += 1
            for j in range(nc):
                m = candidates[j]
                q = gap // m
                r = gap - q * m
                costs[j, 0] += q + 1
                b = bits[j]
                if b > 0:
                    costs[j, 1] += b - 1 if r < cuts[j] else b
    return nnz


@njit(cache=True)
def encode_golomb(values, threshold, m, chunk_size, table, qwords, rwords, swords):
    """Write the ternary-golomb streams of ``values`` (float32[n]) kept at ``threshold``.

    ``table`` (int64[n_chunks, 3]) receives per chunk (base position, unary bit offset, remainder
    bit offset); ``qwords``, ``rwords``, ``swords`` (uint64, zero-filled, sized from
    :func:`count_gap_costs`) receive the unary, remainder and sign streams.
    Returns (nnz, unary bits, remainder bits).
    """
    b = 0
    while (np.int64(1) << b) < m:
        b += 1
    cut = (np.int64(1) << b) - m
    half = (np.int64(1) << (b - 1)) - cut if b > 0 else 0
    qpos = 0
    rpos = 0
    nnz = 0
    nxt = 0
    for i in range(values.shape[0]):
        v = values[i]
        if not _is_kept(v, threshold):
            continue
        if nnz % chunk_size == 0:
            c = nnz // chunk_size
            table[c, 0] = nxt
            table[c, 1] = qpos
            table[c, 2] = rpos
        gap = i - nxt
        nxt = i + 1
        q = gap // m
        r = gap - q * m
        qpos += q
        qwords[qpos >> 6] |= np.uint64(1) << np.uint64(qpos & 63)
        qpos += 1
        if b > 0:
            if r < cut:
                width = b - 1
                field = r
            else:
                width = b
                j = r - cut
                low = cut + j % half
                field = low | ((j // half) << (b - 1))
            if width > 0:
                off = rpos & 63
                rwords[rpos >> 6] |= np.uint64(field) << np.uint64(off)
                if off + width > 64:
                    rwords[(rpos >> 6) + 1] |= np.uint64(field) >> np.uint64(64 - off)
                rpos += width
        if v < 0:
            swords[nnz >> 6] |= np.uint64(1) << np.uint64(nnz & 63)
        nnz += 1
    return nnz, qpos, rpos


# ---------------------------------------------------------------------------------------------
# decoding


@njit(cache=True, inline="always")
def _decode_chunk(table, qwords, rwords, c, n_chunks, nnz, numel, m, b, cut, half, chunk_size,
                  qbits, rbits, positions):
    """Decode the positions of chunk ``c`` into ``positions`` (int64[chunk_size]).

    Returns (status, count, range start, range end): the chunk owns output range [start, end).
    """
    base = table[c, 0]
    qpos = table[c, 1]
    rpos = table[c, 2]
    if c + 1 < n_chunks:
        end = table[c + 1, 0]
        qend = table[c + 1, 1]
        rend = table[c + 1, 2]
    else:
        end = numel
        qend = qbits
        rend = rbits
    count = min(chunk_size, nnz - c * chunk_size)
    if (base < 0 or end > numel or base > end or qpos < 0 or qend > qwords.shape[0] * 64
            or qpos > qend or rpos < 0 or rend > rwords.shape[0] * 64 or rpos > rend
            or count > positions.shape[0] or count < 1):
        return ERR_BOUNDS, 0, 0, 0
    nxt = base
    mask_low = (np.int64(1) << (b - 1)) - 1 if b > 0 else 0
    nrwords = rwords.shape[0]
    for i in range(count):
        if qpos >= qend:
            return ERR_QUOTIENT_OVERRUN, 0, 0, 0
        # unary quotient: count zero bits up to the next one bit
        start = qpos
        word = qwords[qpos >> 6] >> np.uint64(qpos & 63)
        if word != 0:
            qpos += np.int64(trailing_zeros(word)) + 1
        else:
            qpos = ((qpos >> 6) + 1) << 6
            while True:
                if qpos >= qend:
                    return ERR_QUOTIENT_OVERRUN, 0, 0, 0
                word = qwords[qpos >> 6]
                if word != 0:
                    qpos += np.int64(trailing_zeros(word)) + 1
                    break
                qpos += 64
        if qpos > qend:
            return ERR_QUOTIENT_OVERRUN, 0, 0, 0
        q = qpos - start - 1
        # truncated-binary remainder
        r = 0
        if b > 0:
            wi = rpos >> 6
            off = rpos & 63
            v = np.int64(0)
            if wi < nrwords:
                v = np.int64(rwords[wi] >> np.uint64(off))
                if off + b > 64 and wi + 1 < nrwords:
                    v |= np.int64(rwords[wi + 1] << np.uint64(64 - off))
            x = v & mask_low
            if x < cut:
                r = x
                rpos += b - 1
            else:
                r = x + ((v >> (b - 1)) & 1) * half
                rpos += b
            if rpos > rend:
                return ERR_REMAINDER_OVERRUN, 0, 0, 0
        if q > (end - nxt) // m:
            return ERR_POSITION_RANGE, 0, 0, 0
        pos = nxt + q * m + r
        if pos >= end:
            return ERR_POSITION_RANGE, 0, 0, 0
        positions[i] = pos
        nxt = pos + 1
    if qpos != qend:
        return ERR_QUOTIENT_END, 0, 0, 0
    if rpos != rend:
        return ERR_REMAINDER_END, 0, 0, 0
    if c + 1 < n_chunks and nxt != end:
        return ERR_NEXT_BASE, 0, 0, 0
    return OK, count, base, end


@njit(cache=True, parallel=True)
def decode_golomb(table, qwords, rwords, swords, nnz, numel, m, chunk_size, qbits, rbits,
                  mode, out, positive, negative, delta, f16_lut, status):
    """Decode every chunk in parallel and write according to ``mode`` (see ``MODE_*``).

    ``out`` is the flat output as raw bits (uint16[numel] for 16-bit floats, uint32[numel] for
    float32); ``positive``/``negative`` are the value bit patterns (MODE_DENSE); ``delta`` is the
    float32 added per kept entry (MODE_ADD_*, negated for a set sign bit); ``f16_lut``
    (float32[65536]) maps float16 bits to float32; ``status`` (int64[n_chunks]) gets a code per
    chunk.
    """
    n_chunks = table.shape[0]
    b = 0
    while (np.int64(1) << b) < m:
        b += 1
    cut = (np.int64(1) << b) - m
    half = (np.int64(1) << (b - 1)) - cut if b > 0 else 0
    nswords = swords.shape[0]
    for c in prange(n_chunks):
        positions = np.empty(chunk_size, np.int64)
        st, count, start, end = _decode_chunk(table, qwords, rwords, c, n_chunks, nnz, numel, m,
                                              b, cut, half, chunk_size, qbits, rbits, positions)
        status[c] = st
        if st != OK or mode == MODE_CHECK:
            continue
        if end > out.shape[0] or ((c * chunk_size + count - 1) >> 6) >= nswords:
            status[c] = ERR_BOUNDS
            continue
        first = c * chunk_size
        if mode == MODE_DENSE or mode == MODE_SCATTER:
            if mode == MODE_DENSE:
                for p in range(start, end):
                    out[p] = 0
            for i in range(count):
                e = first + i
                if (swords[e >> 6] >> np.uint64(e & 63)) & np.uint64(1):
                    out[positions[i]] = negative
                else:
                    out[positions[i]] = positive
        else:
            for i in range(count):
                e = first + i
                d = delta
                if (swords[e >> 6] >> np.uint64(e & 63)) & np.uint64(1):
                    d = -delta
                p = positions[i]
                if mode == MODE_ADD_F32:
                    w = np.uint32(out[p]).view(np.float32) + d
                    out[p] = np.float32(w).view(np.uint32)
                elif mode == MODE_ADD_BF16:
                    out[p] = f32_to_bf16_bits(bf16_bits_to_f32(out[p]) + d)
                else:
                    out[p] = f32_to_f16_bits(f16_lut[out[p]] + d)


# ---------------------------------------------------------------------------------------------
# selection: exact k-th smallest |value| by two 16-bit histogram passes over float32 bit patterns


@njit(cache=True, parallel=True)
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


@njit(cache=True, parallel=True)
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
