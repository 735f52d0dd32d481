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

from .threads import serialized  # importing it pins a thread-safe threading layer (see threads.py)

# Status codes a decode kernel returns per chunk (0 = the chunk decoded and matched the table).
OK = 0
ERR_QUOTIENT_OVERRUN = 1  # the unary stream ended before the chunk's entries did
ERR_POSITION_RANGE = 3  # a position fell outside [chunk base, next chunk base) or the tensor
ERR_QUOTIENT_END = 4  # the chunk did not end exactly where the next one starts (unary stream)
ERR_HIGH_END = 5  # same, high remainder stream
ERR_NEXT_BASE = 6  # the chunk's last position + 1 differs from the next chunk's base
ERR_BOUNDS = 7  # a table entry points outside the arrays it was given

ERR_TABLE_START = 8  # row 0 is not (0, 0, 0)
ERR_TABLE_RANGE = 9  # a base or offset lies outside the tensor or its stream
ERR_TABLE_ORDER = 10  # bases do not advance by at least the chunk's entries
ERR_TABLE_BITS = 11  # stream offsets do not advance by what the chunk's entries need

STATUS_MESSAGES = {
    ERR_QUOTIENT_OVERRUN: "unary quotient stream ends inside a chunk",
    ERR_POSITION_RANGE: "a decoded position lies outside its chunk or the tensor",
    ERR_QUOTIENT_END: "a chunk's unary bits do not end where the next chunk starts",
    ERR_HIGH_END: "a chunk's high remainder bits do not end where the next chunk starts",
    ERR_NEXT_BASE: "a chunk's last position does not meet the next chunk's base",
    ERR_BOUNDS: "a chunk table entry points outside its stream",
    ERR_TABLE_START: "chunk table invalid: the first chunk does not start at zero",
    ERR_TABLE_RANGE: "chunk table invalid: a base or offset lies outside the tensor or its stream",
    ERR_TABLE_ORDER: "chunk table invalid: bases are not strictly increasing by at least the chunk size",
    ERR_TABLE_BITS: "chunk table invalid: a chunk has fewer unary bits or more high bits than its entries allow",
}

# Output modes of the decode kernel.
MODE_CHECK = 0  # decode and validate only; write nothing
MODE_DENSE = 1  # zero-fill the chunk's range of ``out`` and write the value patterns
MODE_ADD_F32 = 2  # out (float32) += ±delta
MODE_ADD_BF16 = 3  # out (uint16 holding bfloat16) = bf16(f32(out) ± delta)
MODE_ADD_F16 = 4  # out (uint16 holding float16) = f16(f32(out) ± delta)
MODE_SCATTER = 5  # like MODE_DENSE into an output known to be zero: no zero-fill pass
MODE_TIES = 6  # where the entry's sign agrees with aux's (aux >= 0 elects +): out[p] += ±delta and
#               out[numel + p] += 1 (out is float32[2 * numel]: the agreeing sum, then the count)

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
def splitmix64(x):
    """The splitmix64 output function (Steele et al. 2014): a well-mixed uint64 of a uint64."""
    z = np.uint64(x) + np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


@njit(cache=True, inline="always")
def _is_kept(v, threshold):
    return v != 0.0 and abs(v) >= threshold


@njit(cache=True, inline="always")
def golomb_fields(m):
    """(b, cut, half) of Golomb parameter m: b = ceil(log2 m), cut = 2**b - m, half = 2**(b-1) - cut."""
    b = 0
    while (np.int64(1) << b) < m:
        b += 1
    cut = (np.int64(1) << b) - m
    half = (np.int64(1) << (b - 1)) - cut if b > 0 else 0
    return b, cut, half


@njit(cache=True)
def count_gap_costs(values, threshold, candidates, costs):
    """Count kept entries of ``values`` (float32[n]) and the exact stream sizes of their gaps.

    ``candidates`` (int64[c]) are Golomb parameters m >= 1; ``costs`` (int64[c, 2]) receives per
    candidate the unary bits (quotients + terminators) and the high bits (remainders in the long
    form); the low fields add nnz * max(b - 1, 0) bits. Returns nnz.
    """
    nc = candidates.shape[0]
    cuts = np.empty(nc, np.int64)
    for j in range(nc):
        b, cut, half = golomb_fields(candidates[j])
        cuts[j] = cut if b > 0 else np.int64(1) << 62  # m = 1: no remainder, never a high bit
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
                costs[j, 0] += q + 1
                if gap - q * m >= cuts[j]:
                    costs[j, 1] += 1
    return nnz


@njit(cache=True)
def encode_golomb(values, threshold, m, chunk_size, table, qwords, lwords, hwords, swords):
    """Write the ternary-golomb streams of ``values`` (float32[n]) kept at ``threshold``.

    ``table`` (int64[n_chunks, 3]) receives per chunk (base position, unary bit offset, high bit
    offset); ``qwords``, ``lwords``, ``hwords``, ``swords`` (uint64, zero-filled, sized from
    :func:`count_gap_costs`) receive the unary, low, high and sign streams.
    Returns (nnz, unary bits, high bits).
    """
    b, cut, half = golomb_fields(m)
    width = b - 1 if b > 0 else 0
    qpos = 0
    hpos = 0
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


# ---------------------------------------------------------------------------------------------
# decoding


U = np.uint64  # array indices known to be in range: unsigned, so Numba emits no wraparound test


@njit(cache=True)
def check_table(table, nnz, numel, chunk_size, unary_bits, high_bits):
    """Check a chunk table (int64[n_chunks, 3]) against spec/FORMAT.md 5.3; returns OK or ERR_TABLE_*.

    Ranges are checked before differences, so nothing overflows on hostile values.
    """
    n = table.shape[0]
    if n == 0:
        return OK
    if table[0, 0] != 0 or table[0, 1] != 0 or table[0, 2] != 0:
        return ERR_TABLE_START
    for c in range(n):
        if not (0 <= table[c, 0] < numel and 0 <= table[c, 1] <= unary_bits and 0 <= table[c, 2] <= high_bits):
            return ERR_TABLE_RANGE
    for c in range(n):
        count = min(chunk_size, nnz - c * chunk_size)
        if c + 1 < n:
            span = table[c + 1, 0] - table[c, 0]
            qspan = table[c + 1, 1] - table[c, 1]
            hspan = table[c + 1, 2] - table[c, 2]
        else:
            span = numel - table[c, 0]
            qspan = unary_bits - table[c, 1]
            hspan = high_bits - table[c, 2]
        if span < count:
            return ERR_TABLE_ORDER
        if qspan < count or hspan < 0 or hspan > count:
            return ERR_TABLE_BITS
    return OK


# Columns of the per-tensor parameter rows given to the batch kernels.
P_NNZ, P_NUMEL, P_M, P_CHUNK, P_UNARY_BITS, P_HIGH_BITS, P_POSITIVE, P_NEGATIVE = range(8)
P_TABLE, P_UNARY, P_LOW, P_HIGH, P_SIGNS, P_END = range(8, 14)  # word offsets into the shared words array
P_DROP_KEY, P_DROP_CUT = 14, 15  # DARE: entry e is dropped when splitmix64(key + e) >> 1 < cut (cut 0: none)
N_PARAMS = 16


@njit(cache=True)
def _decode_chunk(table, qwords, lwords, hwords, swords, out, aux, params, c, mode, delta, f16_lut):
    """Decode chunk ``c`` of one tensor and write it to ``out`` according to ``mode``.

    ``params`` (int64[N_PARAMS], see ``P_*``). Every read and write is bounds-checked against the
    arrays given; a positive return is an ``ERR_*`` code (writes made before it are discarded by
    the caller, or were preceded by a successful MODE_CHECK pass over the same payload).
    """
    nnz = params[P_NNZ]
    numel = params[P_NUMEL]
    m = params[P_M]
    chunk_size = params[P_CHUNK]
    n_chunks = table.shape[0]
    base = table[c, 0]
    qpos = table[c, 1]
    hpos = table[c, 2]
    if c + 1 < n_chunks:
        end = table[c + 1, 0]
        qend = table[c + 1, 1]
        hend = table[c + 1, 2]
    else:
        end = numel
        qend = params[P_UNARY_BITS]
        hend = params[P_HIGH_BITS]
    count = min(chunk_size, nnz - c * chunk_size)
    first = c * chunk_size
    b, cut, half = golomb_fields(m)
    width = b - 1 if b > 0 else 0
    if (base < 0 or end > numel or base > end or qpos < 0 or qend > qwords.shape[0] * 64 or qpos >= qend
            or hpos < 0 or hend > hwords.shape[0] * 64 or hpos > hend or count < 1
            or ((first + count - 1) >> 6) >= swords.shape[0]
            or ((first + count) * width + 63) >> 6 > lwords.shape[0]
            or (mode != MODE_CHECK and end > out.shape[0])
            or (mode == MODE_TIES and (end > aux.shape[0] or out.shape[0] < 2 * numel))):
        return ERR_BOUNDS
    mask_low = (np.int64(1) << width) - 1
    qmax = numel // m  # q above this cannot land inside the tensor; also keeps q * m from overflowing
    nlwords = lwords.shape[0]
    hlast = hwords.shape[0] - 1
    # high stream: a bit buffer, so that its offset is not on the per-entry dependency chain
    hindex = hpos >> 6
    hbuf = hwords[U(hindex)] >> np.uint64(hpos & 63) if hindex <= hlast else np.uint64(0)
    hleft = 64 - (hpos & 63)
    positive = params[P_POSITIVE]
    flip = params[P_NEGATIVE] ^ positive
    drop_key = np.uint64(params[P_DROP_KEY])
    drop_cut = np.uint64(params[P_DROP_CUT])
    if mode == MODE_DENSE:
        out[base:end] = 0  # a slice store compiles to a vector loop; an indexed loop does not
    # unary stream: walk its one bits word by word (each terminates one quotient)
    wi = qpos >> 6
    word = qwords[U(wi)] & (np.uint64(0xFFFFFFFFFFFFFFFF) << np.uint64(qpos & 63))
    last_one = qpos - 1
    qwords_end = (qend + 63) >> 6
    nxt = base
    for i in range(count):
        while word == 0:
            wi += 1
            if wi >= qwords_end:
                return ERR_QUOTIENT_OVERRUN
            word = qwords[U(wi)]
        one = (wi << 6) + np.int64(trailing_zeros(word))
        if one >= qend:
            return ERR_QUOTIENT_OVERRUN
        word &= word - np.uint64(1)
        q = one - last_one - 1
        last_one = one
        if q > qmax:
            return ERR_POSITION_RANGE
        r = 0
        if b > 0:
            x = np.int64(0)
            if width > 0:  # the fixed-width low field: its place follows from the entry index
                lpos = (first + i) * width
                lw = lpos >> 6
                off = lpos & 63
                x = np.int64(lwords[U(lw)] >> np.uint64(off))
                if off + width > 64 and lw + 1 < nlwords:
                    x |= np.int64(lwords[U(lw + 1)] << np.uint64(64 - off))
                x &= mask_low
            long_form = np.int64(x >= cut)
            r = x + (np.int64(hbuf & np.uint64(1)) & long_form) * half
            hbuf >>= np.uint64(long_form)
            hleft -= long_form
            hpos += long_form
            if hleft == 0:
                hindex += 1
                hbuf = hwords[U(hindex)] if hindex <= hlast else np.uint64(0)
                hleft = 64
        pos = nxt + q * m + r
        if pos >= end:
            return ERR_POSITION_RANGE
        nxt = pos + 1
        e = first + i
        negative = np.int64((swords[U(e >> 6)] >> np.uint64(e & 63)) & np.uint64(1))
        at = U(pos)
        if drop_cut != 0 and (splitmix64(drop_key + np.uint64(e)) >> np.uint64(1)) < drop_cut:
            continue
        if mode == MODE_DENSE or mode == MODE_SCATTER:
            out[at] = positive ^ (negative * flip)
        elif mode == MODE_ADD_F32:
            w = np.uint32(out[at]).view(np.float32) + (-delta if negative else delta)
            out[at] = np.float32(w).view(np.uint32)
        elif mode == MODE_ADD_BF16:
            out[at] = f32_to_bf16_bits(bf16_bits_to_f32(out[at]) + (-delta if negative else delta))
        elif mode == MODE_ADD_F16:
            out[at] = f32_to_f16_bits(f16_lut[U(out[at])] + (-delta if negative else delta))
        elif mode == MODE_TIES:
            if (aux[at] < 0) == (negative == 1):  # the sign the sum elected (a zero sum elects +)
                w = np.uint32(out[at]).view(np.float32) + (-delta if negative else delta)
                out[at] = np.float32(w).view(np.uint32)
                counted = U(pos + numel)
                n = np.uint32(out[counted]).view(np.float32) + np.float32(1.0)
                out[counted] = np.float32(n).view(np.uint32)
    if last_one + 1 != qend:
        return ERR_QUOTIENT_END
    if hpos != hend:
        return ERR_HIGH_END
    if c + 1 < n_chunks and nxt != end:
        return ERR_NEXT_BASE
    return OK


@njit(cache=True, inline="always")
def _parts(words, row):
    """The table (int64[n, 3]) and the four streams of one tensor inside the shared words array."""
    n_chunks = (row[P_UNARY] - row[P_TABLE]) // 3
    table = words[row[P_TABLE]:row[P_UNARY]].view(np.int64).reshape((n_chunks, 3))
    return (table, words[row[P_UNARY]:row[P_LOW]], words[row[P_LOW]:row[P_HIGH]], words[row[P_HIGH]:row[P_SIGNS]],
            words[row[P_SIGNS]:row[P_END]])


@njit(cache=True)
def check_tables(words, params, status):
    """``check_table`` for every tensor (rows of ``params``); ``status`` (int64[t]) gets the codes."""
    for t in range(params.shape[0]):
        row = params[t]
        if not (0 <= row[P_TABLE] <= row[P_UNARY] <= row[P_LOW] <= row[P_HIGH] <= row[P_SIGNS] <= row[P_END]
                <= words.shape[0] and (row[P_UNARY] - row[P_TABLE]) % 3 == 0):
            status[t] = ERR_BOUNDS
            continue
        table = _parts(words, row)[0]
        status[t] = check_table(table, row[P_NNZ], row[P_NUMEL], row[P_CHUNK], row[P_UNARY_BITS], row[P_HIGH_BITS])


@serialized
@njit(cache=True, parallel=True)
def decode_golomb(words, params, outs, auxs, deltas, work, mode, f16_lut, status):
    """Decode many tensors' chunks in one parallel region.

    ``words`` (uint64) holds every tensor's payload; row t of ``params`` (int64[t, N_PARAMS]) gives
    its header fields, value patterns and word offsets (``P_*``); ``outs[t]`` is its flat output
    bits (uint16 or uint32; unused by MODE_CHECK); ``auxs[t]`` the float32 sign-election sums of
    MODE_TIES (empty otherwise); ``deltas[t]`` the float32 step of MODE_ADD_* and MODE_TIES.
    ``work`` (int64[w, 2]) lists (tensor, chunk) pairs; ``status`` (int64[w]) gets a code per pair.
    The caller has run :func:`check_tables` on the same rows.
    """
    for j in prange(work.shape[0]):
        t = work[j, 0]
        row = params[t]
        table, unary, low, high, signs = _parts(words, row)
        status[j] = _decode_chunk(table, unary, low, high, signs, outs[t], auxs[t], row, work[j, 1], mode,
                                  deltas[t], f16_lut)


# ---------------------------------------------------------------------------------------------
# selection: exact k-th smallest |value| by two 16-bit histogram passes over float32 bit patterns


@serialized
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


@serialized
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


@serialized
@njit(cache=True, parallel=True)
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
            if _is_kept(v, threshold):
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
