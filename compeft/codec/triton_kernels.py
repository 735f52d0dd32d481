"""Triton kernels of the ternary-golomb codec for GPUs (spec/FORMAT.md, section "ternary-golomb").

Imported only by :mod:`compeft.gpu`, never by a CPU-only code path. One program decodes one chunk,
not with the CPU kernel's entry-by-entry walk but in tiles of ``BLOCK`` unary bits at a time, every
step a vector operation over the tile:

* a terminator (one bit) at bit ``g`` ends the quotient of entry ``i`` = the number of terminators
  before it in the chunk, so ``Σ_{j<=i} q_j = (g - qpos) - i``: the zeros before it;
* entry ``i``'s low field sits at bit ``(first + i) * width`` of the low stream; whether its
  remainder is in the long form follows from the field alone, and its high bit is the next unread
  one, i.e. the prefix count of long forms before it;
* so ``pos_i = base + m·Σq + Σr + i`` needs only prefix sums (``tl.cumsum``) over the tile plus
  three carries from the tiles before it.

Every load is masked to the stream it reads and every store to ``[base, end)`` of the chunk (the
host has validated the chunk tables, so ``end <= numel``); a chunk whose bits do not decode exactly
as the table says gets a non-zero status (codes of :mod:`compeft.codec.kernels`). Rounding follows
the CPU kernels bit for bit: float32 adds, round to nearest even into bfloat16 / float16 with the
same NaN patterns.
"""

from __future__ import annotations

import triton
import triton.language as tl

from . import kernels

# Columns of a GPU parameter row: the CPU kernel's P_* (0..15), then these.
G_WIDTH, G_CUT, G_HALF, G_OUT, G_AUX, G_DELTA, G_CHUNKS = range(kernels.N_PARAMS, kernels.N_PARAMS + 7)
N_GPU_PARAMS = kernels.N_PARAMS + 7
N_GPU_PARAMS_C = tl.constexpr(N_GPU_PARAMS)

# Modes (the MODE argument of decode_chunks): the CPU kernel's, plus the two of a reversible apply.
MODE_CHECK = kernels.MODE_CHECK  # decode and validate only
MODE_SCATTER = kernels.MODE_SCATTER  # out (zeroed, 16- or 32-bit patterns) [pos] = the entry's pattern
MODE_ADD_F32 = kernels.MODE_ADD_F32  # out (float32) [pos] += ±delta
MODE_ADD_BF16 = kernels.MODE_ADD_BF16  # out (bfloat16 bits) [pos] = bf16(f32(out) ± delta)
MODE_ADD_F16 = kernels.MODE_ADD_F16  # out (float16 bits) [pos] = f16(f32(out) ± delta)
MODE_TIES = kernels.MODE_TIES  # agreeing sum and count, as the CPU kernel's MODE_TIES
MODE_SAVE = 7  # aux (16- or 32-bit, one slot per entry) [e] = out[pos]: what an add will overwrite
MODE_RESTORE = 8  # out[pos] = aux[e]: put the saved values back
# The same values as constexprs, for the kernel's compile-time tests (a jitted function may read
# only constexpr globals).
_OP_CHECK = tl.constexpr(MODE_CHECK)
_OP_SCATTER = tl.constexpr(MODE_SCATTER)
_OP_ADD_F32 = tl.constexpr(MODE_ADD_F32)
_OP_ADD_BF16 = tl.constexpr(MODE_ADD_BF16)
_OP_ADD_F16 = tl.constexpr(MODE_ADD_F16)
_OP_TIES = tl.constexpr(MODE_TIES)
_OP_SAVE = tl.constexpr(MODE_SAVE)
_OP_RESTORE = tl.constexpr(MODE_RESTORE)
# Status codes (compeft.codec.kernels.ERR_*) the kernel reports.
_ERR_QUOTIENT_OVERRUN = tl.constexpr(kernels.ERR_QUOTIENT_OVERRUN)
_ERR_POSITION_RANGE = tl.constexpr(kernels.ERR_POSITION_RANGE)
_ERR_QUOTIENT_END = tl.constexpr(kernels.ERR_QUOTIENT_END)
_ERR_HIGH_END = tl.constexpr(kernels.ERR_HIGH_END)
_ERR_NEXT_BASE = tl.constexpr(kernels.ERR_NEXT_BASE)

_P_NNZ = tl.constexpr(kernels.P_NNZ)
_P_NUMEL = tl.constexpr(kernels.P_NUMEL)
_P_M = tl.constexpr(kernels.P_M)
_P_CHUNK = tl.constexpr(kernels.P_CHUNK)
_P_UNARY_BITS = tl.constexpr(kernels.P_UNARY_BITS)
_P_HIGH_BITS = tl.constexpr(kernels.P_HIGH_BITS)
_P_POSITIVE = tl.constexpr(kernels.P_POSITIVE)
_P_NEGATIVE = tl.constexpr(kernels.P_NEGATIVE)
_P_TABLE = tl.constexpr(kernels.P_TABLE)
_P_UNARY = tl.constexpr(kernels.P_UNARY)
_P_LOW = tl.constexpr(kernels.P_LOW)
_P_HIGH = tl.constexpr(kernels.P_HIGH)
_P_SIGNS = tl.constexpr(kernels.P_SIGNS)
_P_END = tl.constexpr(kernels.P_END)
_P_DROP_KEY = tl.constexpr(kernels.P_DROP_KEY)
_P_DROP_CUT = tl.constexpr(kernels.P_DROP_CUT)
_G_WIDTH = tl.constexpr(G_WIDTH)
_G_CUT = tl.constexpr(G_CUT)
_G_HALF = tl.constexpr(G_HALF)
_G_OUT = tl.constexpr(G_OUT)
_G_AUX = tl.constexpr(G_AUX)
_G_DELTA = tl.constexpr(G_DELTA)
_G_CHUNKS = tl.constexpr(G_CHUNKS)


@triton.jit
def _splitmix64(x):
    """splitmix64 of uint64 ``x`` (as :func:`compeft.codec.kernels.splitmix64`)."""
    z = x + 0x9E3779B97F4A7C15
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9
    z = (z ^ (z >> 27)) * 0x94D049BB133111EB
    return z ^ (z >> 31)


@triton.jit
def _add_as_cpu(w, d):
    """float32 ``w + d`` where a NaN ``w`` comes out as x86 gives it (its own bits, quieted), not
    as the GPU's canonical NaN: the CPU kernels' results, bit for bit (``d`` is never NaN)."""
    quieted = (w.to(tl.uint32, bitcast=True) | 0x400000).to(tl.float32, bitcast=True)
    return tl.where(w != w, quieted, w + d)


@triton.jit
def _f32_to_bf16_bits(f):
    """float32 -> bfloat16 bits (int32 holding 16 bits), nearest even; NaN keeps its top bits, quieted."""
    x = f.to(tl.uint32, bitcast=True)
    rounded = (x + 0x7FFF + ((x >> 16) & 1)) >> 16
    nan = (x & 0x7FFFFFFF) > 0x7F800000
    return tl.where(nan, (x >> 16) | 0x40, rounded).to(tl.int32)


@triton.jit
def _f32_to_f16_bits(f):
    """float32 -> float16 bits (int32 holding 16 bits), nearest even; a NaN becomes sign | 0x7E00."""
    x = f.to(tl.uint32, bitcast=True)
    converted = f.to(tl.float16).to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
    nan = (x & 0x7FFFFFFF) > 0x7F800000
    return tl.where(nan, ((x >> 16) & 0x8000).to(tl.int32) | 0x7E00, converted)


@triton.jit
def decode_chunks(words_ptr, params_ptr, work_ptr, status_ptr, MODE: tl.constexpr, WIDE: tl.constexpr,
                  DROPS: tl.constexpr, IDX: tl.constexpr, BLOCK: tl.constexpr):
    """Decode chunk ``work[j, 1]`` of tensor ``work[j, 0]`` for program j (see the module docstring).

    ``words_ptr``: int64 words of every tensor's payload; ``params_ptr``: int64[t, N_GPU_PARAMS];
    ``work_ptr``: int64[w, 2]; ``status_ptr``: int64[w] receives 0 or an ``ERR_*`` code. ``WIDE``:
    32-bit outputs (float32), else 16-bit. ``DROPS``: apply DARE drops. ``IDX``: tl.int32 when
    every chunk of the launch is narrow (see :func:`compeft.gpu.narrow`), else tl.int64.
    ``BLOCK`` <= 4096.
    """
    j = tl.program_id(0).to(tl.int64)
    t = tl.load(work_ptr + 2 * j)
    c = tl.load(work_ptr + 2 * j + 1)
    row = params_ptr + t * N_GPU_PARAMS_C
    nnz = tl.load(row + _P_NNZ)
    numel = tl.load(row + _P_NUMEL)
    m = tl.load(row + _P_M)
    chunk = tl.load(row + _P_CHUNK)
    table = tl.load(row + _P_TABLE)
    unary_at = tl.load(row + _P_UNARY)
    low_at = tl.load(row + _P_LOW)
    high_at = tl.load(row + _P_HIGH)
    signs_at = tl.load(row + _P_SIGNS)
    width = tl.load(row + _G_WIDTH)
    cut = tl.load(row + _G_CUT)
    half = tl.load(row + _G_HALF)
    n_chunks = tl.load(row + _G_CHUNKS)

    base = tl.load(words_ptr + table + 3 * c)
    qpos = tl.load(words_ptr + table + 3 * c + 1)
    hpos = tl.load(words_ptr + table + 3 * c + 2)
    has_next = c + 1 < n_chunks
    end = tl.where(has_next, tl.load(words_ptr + table + 3 * c + 3, mask=has_next, other=0), numel)
    qend = tl.where(has_next, tl.load(words_ptr + table + 3 * c + 4, mask=has_next, other=0),
                    tl.load(row + _P_UNARY_BITS))
    hend = tl.where(has_next, tl.load(words_ptr + table + 3 * c + 5, mask=has_next, other=0),
                    tl.load(row + _P_HIGH_BITS))
    first = c * chunk
    count = tl.minimum(chunk, nnz - first)
    span = end - base

    # Chunk-relative coordinates in IDX: int32 when the host found every chunk of the launch narrow
    # (spans < 2**30, m < 2**19), which halves the cost of most lane arithmetic; else int64.
    nbits = (qend - qpos).to(IDX)
    count_i = count.to(IDX)
    span_i = span.to(IDX)
    m_i = m.to(IDX)
    width_i = width.to(IDX)
    cut_i = cut.to(IDX)
    half_i = half.to(IDX)
    qcap = (span // m + 1).to(IDX)  # a valid entry has fewer zeros before it than this
    mask_low = (tl.full((), 1, IDX) << width_i) - 1
    unary0 = words_ptr + unary_at + (qpos >> 6)
    unary_bit = (qpos & 63).to(IDX)
    low_first = first * width
    low0 = words_ptr + low_at + (low_first >> 6)
    low_bit = (low_first & 63).to(IDX)
    low_words = tl.minimum(high_at - low_at - (low_first >> 6), 1 << 30).to(IDX)
    high0 = words_ptr + high_at + (hpos >> 6)
    high_bit = (hpos & 63).to(IDX)
    high_count = (hend - hpos).to(IDX)
    signs0 = words_ptr + signs_at + (first >> 6)
    sign_bit = (first & 63).to(IDX)

    if MODE != _OP_CHECK:
        if WIDE:
            out32 = tl.load(row + _G_OUT).to(tl.pointer_type(tl.int32)) + base
        else:
            out16 = tl.load(row + _G_OUT).to(tl.pointer_type(tl.int16)) + base
    if MODE == _OP_SAVE or MODE == _OP_RESTORE:
        if WIDE:
            aux32 = tl.load(row + _G_AUX).to(tl.pointer_type(tl.int32)) + first
        else:
            aux16 = tl.load(row + _G_AUX).to(tl.pointer_type(tl.int16)) + first
    if MODE == _OP_TIES:
        aux_f = tl.load(row + _G_AUX).to(tl.pointer_type(tl.float32)) + base
        counted = tl.load(row + _G_OUT).to(tl.pointer_type(tl.int32)) + numel + base
    positive = tl.load(row + _P_POSITIVE)
    negative = tl.load(row + _P_NEGATIVE)
    delta = tl.load(row + _G_DELTA).to(tl.int32).to(tl.float32, bitcast=True)
    drop_key = tl.load(row + _P_DROP_KEY).to(tl.uint64, bitcast=True) + first.to(tl.uint64, bitcast=True)
    drop_cut = tl.load(row + _P_DROP_CUT).to(tl.uint64, bitcast=True)

    # Carries from tile to tile. Block-wide reductions cost a barrier each, so a tile does two:
    # the entry, long-form and bad-entry counts packed into one int64 sum, and the Σ r.
    seen = tl.zeros((), IDX)  # terminators so far
    longs = tl.zeros((), IDX)  # long-form remainders so far
    rsum = tl.zeros((), IDX)  # Σ r so far
    bad = tl.zeros((), tl.int64)  # entries whose position fell outside the chunk
    lanes = tl.arange(0, BLOCK).to(IDX)
    for start in range(0, nbits, BLOCK):
        rel = start + lanes  # unary bit, from the chunk's first
        inside = rel < nbits
        bit = unary_bit + rel
        word = tl.load(unary0 + (bit >> 6), mask=inside, other=0).to(tl.uint64, bitcast=True)
        term = inside & (((word >> (bit & 63).to(tl.uint64)) & 1) != 0)
        i = seen + tl.cumsum(term.to(IDX), 0) - 1  # the entry this terminator ends (chunk-local)
        valid = term & (i < count_i)
        lbit = low_bit + i * width_i
        lw = lbit >> 6
        off = (lbit & 63).to(tl.uint64)
        lo = tl.load(low0 + lw, mask=valid & (lw < low_words), other=0).to(tl.uint64, bitcast=True)
        hi = tl.load(low0 + lw + 1, mask=valid & (lw + 1 < low_words), other=0).to(tl.uint64, bitcast=True)
        x = ((lo >> off) | ((hi << 1) << (63 - off))).to(tl.int64, bitcast=True).to(IDX) & mask_low
        long_form = valid & (x >= cut_i)
        h = longs + tl.cumsum(long_form.to(IDX), 0) - 1
        hbit = high_bit + h
        hword = tl.load(high0 + (hbit >> 6), mask=long_form & (h < high_count), other=0).to(tl.uint64, bitcast=True)
        r = tl.where(valid, x + ((hword >> (hbit & 63).to(tl.uint64)) & 1).to(IDX) * half_i, 0)
        zeros = rel - i  # Σ q over this entry and the ones before it
        pos = m_i * tl.minimum(zeros, qcap) + rsum + tl.cumsum(r, 0) + i  # from the chunk's base
        ok = valid & (zeros < qcap) & (pos >= 0) & (pos < span_i)  # >= 0: no wrapped sum slips in
        counts = tl.sum(term.to(tl.int64) | (long_form.to(tl.int64) << 16) | ((valid & ~ok).to(tl.int64) << 32), 0)
        seen += (counts & 0xFFFF).to(IDX)
        longs += ((counts >> 16) & 0xFFFF).to(IDX)
        bad += counts >> 32
        rsum += tl.sum(r, 0)
        if MODE != _OP_CHECK:
            sbit = sign_bit + i
            sword = tl.load(signs0 + (sbit >> 6), mask=ok, other=0).to(tl.uint64, bitcast=True)
            neg = ((sword >> (sbit & 63).to(tl.uint64)) & 1) != 0
            if DROPS:
                ok = ok & ((_splitmix64(drop_key + i.to(tl.uint64)) >> 1) >= drop_cut)
            if MODE == _OP_SCATTER:
                pattern = tl.where(neg, negative, positive)
                if WIDE:
                    tl.store(out32 + pos, pattern.to(tl.int32), mask=ok)
                else:
                    tl.store(out16 + pos, pattern.to(tl.int16), mask=ok)
            elif MODE == _OP_ADD_F32:
                w32 = tl.load(out32 + pos, mask=ok, other=0).to(tl.float32, bitcast=True)
                w32 = _add_as_cpu(w32, tl.where(neg, -delta, delta))
                tl.store(out32 + pos, w32.to(tl.int32, bitcast=True), mask=ok)
            elif MODE == _OP_ADD_BF16:
                w16 = tl.load(out16 + pos, mask=ok, other=0).to(tl.uint16, bitcast=True).to(tl.uint32)
                wf = _add_as_cpu((w16 << 16).to(tl.float32, bitcast=True), tl.where(neg, -delta, delta))
                tl.store(out16 + pos, _f32_to_bf16_bits(wf).to(tl.int16), mask=ok)
            elif MODE == _OP_ADD_F16:
                w16 = tl.load(out16 + pos, mask=ok, other=0).to(tl.float16, bitcast=True)
                wf = _add_as_cpu(w16.to(tl.float32), tl.where(neg, -delta, delta))
                tl.store(out16 + pos, _f32_to_f16_bits(wf).to(tl.int16), mask=ok)
            elif MODE == _OP_TIES:
                elected_negative = tl.load(aux_f + pos, mask=ok, other=0.0) < 0
                agree = ok & (elected_negative == neg)
                w32 = tl.load(out32 + pos, mask=agree, other=0).to(tl.float32, bitcast=True)
                w32 = w32 + tl.where(neg, -delta, delta)
                tl.store(out32 + pos, w32.to(tl.int32, bitcast=True), mask=agree)
                n32 = tl.load(counted + pos, mask=agree, other=0).to(tl.float32, bitcast=True) + 1.0
                tl.store(counted + pos, n32.to(tl.int32, bitcast=True), mask=agree)
            elif MODE == _OP_SAVE:
                if WIDE:
                    tl.store(aux32 + i, tl.load(out32 + pos, mask=ok, other=0), mask=ok)
                else:
                    tl.store(aux16 + i, tl.load(out16 + pos, mask=ok, other=0), mask=ok)
            elif MODE == _OP_RESTORE:
                if WIDE:
                    tl.store(out32 + pos, tl.load(aux32 + i, mask=ok, other=0), mask=ok)
                else:
                    tl.store(out16 + pos, tl.load(aux16 + i, mask=ok, other=0), mask=ok)

    # With exactly `count` terminators, the last at the chunk's last unary bit, the last entry's
    # position follows from the carries: Σ q = (nbits - 1) - (count - 1).
    last = unary_bit + nbits - 1
    last_word = tl.load(unary0 + (last >> 6), mask=nbits > 0, other=0).to(tl.uint64, bitcast=True)
    ends_on_one = (nbits > 0) & (((last_word >> (last & 63).to(tl.uint64)) & 1) != 0)
    last_pos = m_i * tl.minimum(nbits - count_i, qcap) + rsum + count_i - 1
    code = tl.zeros((), tl.int64)
    code = tl.where((c + 1 < n_chunks) & (last_pos + 1 != span_i), _ERR_NEXT_BASE, code)
    code = tl.where(bad != 0, _ERR_POSITION_RANGE, code)
    code = tl.where(longs != high_count, _ERR_HIGH_END, code)
    code = tl.where((seen > count_i) | ~ends_on_one, _ERR_QUOTIENT_END, code)
    code = tl.where(seen < count_i, _ERR_QUOTIENT_OVERRUN, code)
    tl.store(status_ptr + j, code)

