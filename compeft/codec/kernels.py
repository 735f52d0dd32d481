"""Numba kernels of the ternary-golomb decoder (spec/FORMAT.md, section "ternary-golomb"), and the
codes, modes and parameter columns every codec kernel shares (the encoder's kernels are in
:mod:`compeft.codec.encode_kernels`, the selection's in :mod:`compeft.codec.select_kernels`).

Kernels see only contiguous numpy arrays and scalars; the caller allocates every output and has
validated every offset and length (see :mod:`compeft.codec.golomb`). Each kernel still stops at
the end of its inputs and outputs on its own and reports a status code instead of raising, because
Numba does not bounds-check and no Python object may cross the kernel boundary.

Decoding has three layers. :func:`walk_chunk` walks one chunk (the unary word scan, the low and
high fields, positions, signs and every validity check, written once); an operation is a triple
of functions it is given, ``begin`` (check the chunk's output range), ``fill`` (prepare a part of
it: dense decoding zeroes it) and ``visit`` (write one kept entry), from
:mod:`compeft.codec.decode_ops`. One cached kernel per operation (``*_chunk``) inlines the walker
with its triple, so every hot loop is specialised to its operation: no per-entry branch on it is left. One parallel driver per operation (``*_chunks``,
see :data:`DRIVERS`) runs that kernel over (tensor, chunk) pairs.

Bit streams are arrays of little-endian uint64 words; bit ``i`` of a stream is bit ``i % 64`` of
word ``i // 64``. No ``fastmath`` anywhere: decode is bit-exact by specification.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange
from numba.cpython.unsafe.numbers import trailing_zeros

from ..errors import InvalidArgumentError
from .arrays import address_table, array_at
from .decode_ops import (U, begin_nothing, begin_out, begin_ties, fill_nothing, fill_zeros, splitmix64,  # noqa: F401
                         visit_add_bf16, visit_add_f16, visit_add_f32, visit_add_f32_dare, visit_nothing,
                         visit_pattern, visit_ties, visit_ties_dare)
from .floats import F16_TO_F32  # noqa: F401 (the table the add_f16 drivers take, importable here as before)
from .tally import low_sums, ones_between
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

# Decode operations (each has its driver in DRIVERS; golomb.decode_many checks the output dtypes).
MODE_CHECK = 0  # decode and validate only; write nothing
MODE_DENSE = 1  # zero-fill the chunk's range of ``out`` and write the value patterns
MODE_ADD_F32 = 2  # out (float32) += ±delta
MODE_ADD_BF16 = 3  # out (uint16 holding bfloat16) = bf16(f32(out) ± delta)
MODE_ADD_F16 = 4  # out (uint16 holding float16) = f16(f32(out) ± delta)
MODE_SCATTER = 5  # like MODE_DENSE into an output known to be zero: no zero-fill pass
MODE_TIES = 6  # where the entry's sign agrees with aux's (aux >= 0 elects +): out[p] += ±delta and
#               out[numel + p] += 1 (out is float32[2 * numel]: the agreeing sum, then the count)
MODES = (MODE_CHECK, MODE_DENSE, MODE_ADD_F32, MODE_ADD_BF16, MODE_ADD_F16, MODE_SCATTER, MODE_TIES)
DARE_MODES = (MODE_ADD_F32, MODE_TIES)  # the merge passes: the only ones that drop entries (DARE)

# Columns of the per-tensor parameter rows given to the batch kernels.
P_NNZ, P_NUMEL, P_M, P_CHUNK, P_UNARY_BITS, P_HIGH_BITS, P_POSITIVE, P_NEGATIVE = range(8)
P_TABLE, P_UNARY, P_LOW, P_HIGH, P_SIGNS, P_END = range(8, 14)  # word offsets into the shared words array
P_DROP_KEY, P_DROP_CUT = 14, 15  # DARE: entry e is dropped when splitmix64(key + e) >> 1 < cut (cut 0: none)
N_PARAMS = 16


# ---------------------------------------------------------------------------------------------
# shared arithmetic


@njit(cache=True, inline="always")
def golomb_fields(m):
    """(b, w, cut, half) of Golomb parameter m >= 1: the in-kernel twin of
    :func:`compeft.format.header.golomb_fields` (same values, m = 1 gives (0, 0, 1, 0))."""
    b = 0
    while (np.int64(1) << b) < m:
        b += 1
    if b == 0:
        return 0, 0, np.int64(1), np.int64(0)
    cut = (np.int64(1) << b) - m
    return b, b - 1, cut, (np.int64(1) << (b - 1)) - cut


# ---------------------------------------------------------------------------------------------
# decoding: chunk tables


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


# ---------------------------------------------------------------------------------------------
# decoding: the chunk walker


@njit(cache=True, inline="always")
def tensor_parts(words, row):
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
        table = tensor_parts(words, row)[0]
        status[t] = check_table(table, row[P_NNZ], row[P_NUMEL], row[P_CHUNK], row[P_UNARY_BITS], row[P_HIGH_BITS])


@njit(cache=True, inline="always")
def chunk_span(words, row, c):
    """Chunk ``c`` of the tensor of parameter row ``row``: (its four streams, base, end, qpos, qend,
    hpos, hend, index of its first entry, its entries, whether it is the tensor's last chunk, and
    whether its entries all lie inside the arrays given: the checks every reader of a chunk makes
    before its first read)."""
    table, qwords, lwords, hwords, swords = tensor_parts(words, row)
    numel = row[P_NUMEL]
    last = c + 1 >= table.shape[0]
    if not last:
        end, qend, hend = table[c + 1, 0], table[c + 1, 1], table[c + 1, 2]
    else:
        end, qend, hend = numel, row[P_UNARY_BITS], row[P_HIGH_BITS]
    base, qpos, hpos = table[c, 0], table[c, 1], table[c, 2]
    first = c * row[P_CHUNK]
    count = min(row[P_CHUNK], row[P_NNZ] - first)
    width = golomb_fields(row[P_M])[1]
    inside = not (base < 0 or end > numel or base > end or qpos < 0 or qend > qwords.shape[0] * 64 or qpos >= qend
                  or hpos < 0 or hend > hwords.shape[0] * 64 or hpos > hend or count < 1
                  or ((first + count - 1) >> 6) >= swords.shape[0]
                  or ((first + count) * width + 63) >> 6 > lwords.shape[0])
    return (qwords, lwords, hwords, swords), base, end, qpos, qend, hpos, hend, first, count, last, inside


BLOCK = 256  # entries a walk decodes into positions, checked at once, before it writes any of them


@njit(inline="always")  # inlined into each *_chunk kernel, where begin, fill and visit resolve statically
def walk_chunk(words, row, c, op, begin, fill, visit):
    """Decode chunk ``c`` of the tensor whose parameter row (int64[N_PARAMS], see ``P_*``) is
    ``row``: ``begin(op, base, end, numel)`` once (False: the output cannot take the chunk's range),
    then per block of ``BLOCK`` entries ``fill(op, start, stop)`` up to its last position and
    ``visit(op, position, entry, negative)`` per entry in order; ``fill`` up to the chunk's end.
    Reads are bounds-checked against the arrays given (writes by ``begin``); a positive return is
    the ``ERR_*`` code of the first bad entry: writes made before it are discarded by the caller,
    or were preceded by a successful check pass over the same payload.
    """
    streams, base, end, qpos, qend, hpos, hend, first, count, last_chunk, inside = chunk_span(words, row, c)
    qwords, lwords, hwords, swords = streams
    numel = row[P_NUMEL]
    m = row[P_M]
    b, width, cut, half = golomb_fields(m)
    if not inside:
        return ERR_BOUNDS
    if not begin(op, base, end, numel):
        return ERR_BOUNDS
    mask_low = (np.int64(1) << width) - 1
    whole = 6 - np.int64(trailing_zeros(U(width))) if 0 < width < 64 and not width & (width - 1) else 0
    qmax = numel // m  # q above this cannot land inside the tensor; also keeps q * m from overflowing
    nlwords = lwords.shape[0]
    hlast = hwords.shape[0] - 1
    # high stream: a bit buffer, so that its offset is not on the per-entry dependency chain
    hindex = hpos >> 6
    hbuf = hwords[U(hindex)] >> np.uint64(hpos & 63) if hindex <= hlast else np.uint64(0)
    hleft = 64 - (hpos & 63)
    # unary stream: its one bits word by word (each ends a quotient); bits from qend on masked off
    qlast = (qend - 1) >> 6
    tail = np.uint64(0xFFFFFFFFFFFFFFFF) >> np.uint64(63 - ((qend - 1) & 63))
    wi = qpos >> 6
    word = qwords[U(wi)] & (np.uint64(0xFFFFFFFFFFFFFFFF) << np.uint64(qpos & 63))
    if wi == qlast:
        word &= tail
    last_one = qpos - 1
    nxt = base
    filled = base
    positions = np.empty(min(BLOCK, count), dtype=np.int64)
    for start in range(0, count, BLOCK):
        n = min(BLOCK, count - start)
        bad = False  # some q > qmax: each q is checked, the positions only once per block
        overrun = False
        for i in range(n):
            while word == 0:
                wi += 1
                if wi > qlast:
                    break
                word = qwords[U(wi)]
                if wi == qlast:
                    word &= tail
            if word == 0:  # past qend
                overrun = True
                break
            one = (wi << 6) + np.int64(trailing_zeros(word))
            word &= word - np.uint64(1)
            q = one - last_one - 1
            last_one = one
            bad |= q > qmax
            r = 0
            if b > 0:
                x = np.int64(0)
                if whole > 0:  # 2^j-bit fields never straddle words (walk -11 % at w = 2, benchmarks/README)
                    e = first + start + i  # the field's word is e >> (6 - j)
                    x = np.int64(lwords[U(e >> whole)] >> np.uint64((e & ((1 << whole) - 1)) << (6 - whole)))
                    x &= mask_low
                elif width > 0:
                    lpos = (first + start + i) * width
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
                if hleft == 0:
                    hindex += 1
                    hbuf = hwords[U(hindex)] if hindex <= hlast else np.uint64(0)
                    hleft = 64
            # no overflow before the check below: q * m <= numel < 2^48 and r < m < 2^48 per entry
            nxt += q * m + r
            positions[i] = nxt
            nxt += 1
        if bad or nxt > end:  # an entry before the overrun (if any) left the chunk: the walk's order
            return ERR_POSITION_RANGE
        if overrun:
            return ERR_QUOTIENT_OVERRUN
        fill(op, filled, nxt)
        filled = nxt
        for i in range(n):
            e = first + start + i
            visit(op, U(positions[i]), e, np.int64((swords[U(e >> 6)] >> np.uint64(e & 63)) & np.uint64(1)))
    fill(op, filled, end)
    if last_one + 1 != qend:
        return ERR_QUOTIENT_END
    if (hindex << 6) + 64 - hleft != hend:  # the bits read: hindex * 64 + 64 - hleft throughout
        return ERR_HIGH_END
    if not last_chunk and nxt != end:
        return ERR_NEXT_BASE
    return OK


@njit(cache=True)
def tally_chunk(words, row, c):
    """OK exactly when :func:`walk_chunk` accepts chunk ``c``, from tallies over its streams instead
    of a walk over its entries (:mod:`compeft.codec.tally`); otherwise a non-zero code, not
    necessarily the walk's. A chunk whose sums could overflow int64 (2^(60 − w) entries or more
    with w-bit low fields: only for m near the 2^48 limit) is never tallied OK: the walk judges it."""
    streams, base, end, qpos, qend, hpos, hend, first, count, last_chunk, inside = chunk_span(words, row, c)
    qwords, lwords, hwords, swords = streams
    numel, m = row[P_NUMEL], row[P_M]
    b, width, cut, half = golomb_fields(m)
    if not inside:
        return ERR_BOUNDS
    if count > np.int64(1) << (60 - width):  # sums that could overflow (m near 2^48): left to the walk
        return ERR_BOUNDS
    if ones_between(qwords, qpos, qend) != count or not (qwords[U((qend - 1) >> 6)] >> U((qend - 1) & 63)) & U(1):
        return ERR_QUOTIENT_END
    quotients = qend - qpos - count  # Σq: every zero of the range belongs to one quotient
    if quotients > numel // m:  # the last position would pass the tensor (and m·Σq cannot overflow)
        return ERR_POSITION_RANGE
    low, longs = np.int64(0), np.int64(0)
    if b > 0:
        low, longs = low_sums(lwords, first, count, width, cut) if width > 0 else (np.int64(0), count)
    if longs != hend - hpos:
        return ERR_HIGH_END
    last = base + m * quotients + low + half * ones_between(hwords, hpos, hend) + count - 1
    if last >= end:
        return ERR_POSITION_RANGE
    if not last_chunk and last + 1 != end:
        return ERR_NEXT_BASE
    return OK


# ---------------------------------------------------------------------------------------------
# decoding: one cached kernel per operation (the walker with its begin and visit inlined) ...


@njit(cache=True)
def check_chunk(words, row, c):
    return walk_chunk(words, row, c, (0,), begin_nothing, fill_nothing, visit_nothing)


@njit(cache=True)
def dense_chunk(words, row, c, out):
    return walk_chunk(words, row, c, (out, row[P_POSITIVE], row[P_POSITIVE] ^ row[P_NEGATIVE]), begin_out,
                      fill_zeros, visit_pattern)


@njit(cache=True)
def scatter_chunk(words, row, c, out):
    return walk_chunk(words, row, c, (out, row[P_POSITIVE], row[P_POSITIVE] ^ row[P_NEGATIVE]), begin_out,
                      fill_nothing, visit_pattern)


@njit(cache=True)
def add_f32_chunk(words, row, c, out, step):
    return walk_chunk(words, row, c, (out, step), begin_out, fill_nothing, visit_add_f32)


@njit(cache=True)
def add_bf16_chunk(words, row, c, out, step):
    return walk_chunk(words, row, c, (out, step), begin_out, fill_nothing, visit_add_bf16)


@njit(cache=True)
def add_f16_chunk(words, row, c, out, step, f16_lut):
    return walk_chunk(words, row, c, (out, step, f16_lut), begin_out, fill_nothing, visit_add_f16)


@njit(cache=True)
def ties_chunk(words, row, c, out, aux, step):
    return walk_chunk(words, row, c, (out, aux, step, row[P_NUMEL]), begin_ties, fill_nothing, visit_ties)


@njit(cache=True)
def add_f32_dare_chunk(words, row, c, out, step):
    op = (out, step, U(row[P_DROP_KEY]), U(row[P_DROP_CUT]))
    return walk_chunk(words, row, c, op, begin_out, fill_nothing, visit_add_f32_dare)


@njit(cache=True)
def ties_dare_chunk(words, row, c, out, aux, step):
    op = (out, aux, step, row[P_NUMEL], U(row[P_DROP_KEY]), U(row[P_DROP_CUT]))
    return walk_chunk(words, row, c, op, begin_ties, fill_nothing, visit_ties_dare)


# ... and one parallel driver per operation over (tensor, chunk) pairs.
#
# Every driver takes (words, params, outs, like, auxs, steps, work, f16_lut, status): ``words``
# (uint64) holds every tensor's payload; row t of ``params`` (int64[t, N_PARAMS]) gives its header
# fields, value patterns, word offsets and DARE drops (``P_*``); row t of ``outs`` (an address
# table, :mod:`compeft.codec.arrays`) is its flat output bits, of ``like``'s dtype (uint16 or
# uint32; unused by check); row t of ``auxs`` (an address table too) the float32 sign-election sums
# of TIES; ``steps[t]`` the float32 step (scale × magnitude) of the adds and TIES; ``f16_lut`` is
# F16_TO_F32. ``work`` (int64[w, 2]) lists (tensor, chunk) pairs; ``status`` (int64[w]) gets a
# code per pair. The caller has run :func:`check_tables` on the same rows and checked the dtypes;
# :func:`decode_golomb` builds the address tables from arrays it checks.


@serialized
@njit(cache=True, parallel=True)
def check_chunks(words, params, outs, like, auxs, steps, work, f16_lut, status):
    for j in prange(work.shape[0]):
        row = params[work[j, 0]]
        verdict = tally_chunk(words, row, work[j, 1])
        status[j] = OK if verdict == OK else check_chunk(words, row, work[j, 1])  # rejected: walk for the exact code


@serialized
@njit(cache=True, parallel=True)
def dense_chunks(words, params, outs, like, auxs, steps, work, f16_lut, status):
    for j in prange(work.shape[0]):
        t = work[j, 0]
        status[j] = dense_chunk(words, params[t], work[j, 1], array_at(outs, t, like))


@serialized
@njit(cache=True, parallel=True)
def scatter_chunks(words, params, outs, like, auxs, steps, work, f16_lut, status):
    for j in prange(work.shape[0]):
        t = work[j, 0]
        status[j] = scatter_chunk(words, params[t], work[j, 1], array_at(outs, t, like))


@serialized
@njit(cache=True, parallel=True)
def add_f32_chunks(words, params, outs, like, auxs, steps, work, f16_lut, status):
    for j in prange(work.shape[0]):
        t = work[j, 0]
        status[j] = add_f32_chunk(words, params[t], work[j, 1], array_at(outs, t, like), steps[t])


@serialized
@njit(cache=True, parallel=True)
def add_bf16_chunks(words, params, outs, like, auxs, steps, work, f16_lut, status):
    for j in prange(work.shape[0]):
        t = work[j, 0]
        status[j] = add_bf16_chunk(words, params[t], work[j, 1], array_at(outs, t, like), steps[t])


@serialized
@njit(cache=True, parallel=True)
def add_f16_chunks(words, params, outs, like, auxs, steps, work, f16_lut, status):
    for j in prange(work.shape[0]):
        t = work[j, 0]
        status[j] = add_f16_chunk(words, params[t], work[j, 1], array_at(outs, t, like), steps[t], f16_lut)


@serialized
@njit(cache=True, parallel=True)
def ties_chunks(words, params, outs, like, auxs, steps, work, f16_lut, status):
    for j in prange(work.shape[0]):
        t = work[j, 0]
        out, aux = array_at(outs, t, like), array_at(auxs, t, steps)
        status[j] = ties_chunk(words, params[t], work[j, 1], out, aux, steps[t])


@serialized
@njit(cache=True, parallel=True)
def add_f32_dare_chunks(words, params, outs, like, auxs, steps, work, f16_lut, status):
    for j in prange(work.shape[0]):
        t = work[j, 0]
        status[j] = add_f32_dare_chunk(words, params[t], work[j, 1], array_at(outs, t, like), steps[t])


@serialized
@njit(cache=True, parallel=True)
def ties_dare_chunks(words, params, outs, like, auxs, steps, work, f16_lut, status):
    for j in prange(work.shape[0]):
        t = work[j, 0]
        out, aux = array_at(outs, t, like), array_at(auxs, t, steps)
        status[j] = ties_dare_chunk(words, params[t], work[j, 1], out, aux, steps[t])


DRIVERS = {MODE_CHECK: check_chunks, MODE_DENSE: dense_chunks, MODE_SCATTER: scatter_chunks,
           MODE_ADD_F32: add_f32_chunks, MODE_ADD_BF16: add_bf16_chunks, MODE_ADD_F16: add_f16_chunks,
           MODE_TIES: ties_chunks}
DARE_DRIVERS = {MODE_ADD_F32: add_f32_dare_chunks, MODE_TIES: ties_dare_chunks}


def decode_golomb(words, params, outs, auxs, steps, work, mode, f16_lut, status):
    """Decode the (tensor, chunk) pairs of ``work`` with the driver of ``mode``: ``outs[t]`` and
    ``auxs[t]`` are tensor t's output bits and TIES sums, sequences of numpy arrays (each 1-D,
    contiguous, writeable; the outputs of one dtype, uint16 or uint32; the sums float32); ``outs``
    is None for MODE_CHECK and ``auxs`` None for every mode but MODE_TIES (they read none); the
    other arguments are the drivers'. Rows with DARE drops (``P_DROP_CUT`` not 0) need a mode of
    ``DARE_MODES``."""
    if mode not in DRIVERS:
        raise InvalidArgumentError(f"unknown decode mode {mode!r}")
    drivers = DRIVERS
    if params.shape[0] and params[:, P_DROP_CUT].any():
        if mode not in DARE_DRIVERS:
            raise InvalidArgumentError(f"decode mode {mode} does not drop entries (DARE is for merges)")
        drivers = DARE_DRIVERS
    if (outs is None) != (mode == MODE_CHECK) or (auxs is None) != (mode != MODE_TIES):
        raise InvalidArgumentError("decode takes outputs for every mode but check, aux arrays for ties only")
    rows = params.shape[0]
    if outs is not None and len(outs) != rows or auxs is not None and len(auxs) != rows:
        raise InvalidArgumentError("decode needs one output (and for ties one aux array) per parameter row")
    like = np.empty(0, dtype=outs[0].dtype if outs is not None and rows and isinstance(outs[0], np.ndarray)
                    else np.uint32)
    if like.dtype not in (np.uint16, np.uint32):
        raise InvalidArgumentError(f"decode outputs are uint16 or uint32 bits, not {like.dtype}")
    steps = np.ascontiguousarray(steps, dtype=np.float32)
    nothing = np.zeros((rows, 2), dtype=np.int64)  # rows of length 0, for the arrays a mode never reads
    out_table = nothing if outs is None else address_table(outs, like.dtype, "output")
    aux_table = nothing if auxs is None else address_table(auxs, steps.dtype, "aux array")
    drivers[mode](words, params, out_table, like, aux_table, steps, work, f16_lut, status)
