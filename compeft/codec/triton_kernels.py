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
G_WIDTH, G_CUT, G_HALF, G_QMAX, G_OUT, G_AUX, G_DELTA, G_CHUNKS = range(kernels.N_PARAMS, kernels.N_PARAMS + 8)
N_GPU_PARAMS = kernels.N_PARAMS + 8
N_GPU_PARAMS_C = tl.constexpr(N_GPU_PARAMS)

# Modes: the CPU kernel's, plus the two of a reversible apply.
MODE_CHECK = kernels.MODE_CHECK
MODE_SCATTER = kernels.MODE_SCATTER  # out (zeroed, 16- or 32-bit patterns) [pos] = the entry's pattern
MODE_ADD_F32 = kernels.MODE_ADD_F32
MODE_ADD_BF16 = kernels.MODE_ADD_BF16
MODE_ADD_F16 = kernels.MODE_ADD_F16
MODE_TIES = kernels.MODE_TIES
MODE_SAVE = 7  # aux (16- or 32-bit, one slot per entry) [e] = out[pos]: what an add will overwrite
MODE_RESTORE = 8  # out[pos] = aux[e]: put the saved values back

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
_G_QMAX = tl.constexpr(G_QMAX)
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
                  DROPS: tl.constexpr, SMALL_M: tl.constexpr, BLOCK: tl.constexpr):
    """Decode chunk ``work[j, 1]`` of tensor ``work[j, 0]`` for program j (see the module docstring).

    ``words_ptr``: int64 words of every tensor's payload; ``params_ptr``: int64[t, N_GPU_PARAMS];
    ``work_ptr``: int64[w, 2]; ``status_ptr``: int64[w] receives 0 or an ``ERR_*`` code. ``WIDE``:
    32-bit outputs (float32), else 16-bit. ``DROPS``: apply DARE drops. ``SMALL_M``: every Golomb
    parameter is below 2**19 (so a tile's Σ r fits int32). ``BLOCK`` <= 65535.
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
    qmax = tl.load(row + _G_QMAX)
    n_chunks = tl.load(row + _G_CHUNKS)
    n_low = high_at - low_at
    n_high = signs_at - high_at
    n_signs = tl.load(row + _P_END) - signs_at

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
    mask_low = (tl.full((), 1, tl.int64) << width) - 1

    if MODE != 0:
        if WIDE:
            out32 = tl.load(row + _G_OUT).to(tl.pointer_type(tl.int32))
        else:
            out16 = tl.load(row + _G_OUT).to(tl.pointer_type(tl.int16))
    if MODE == 7 or MODE == 8:
        if WIDE:
            aux32 = tl.load(row + _G_AUX).to(tl.pointer_type(tl.int32))
        else:
            aux16 = tl.load(row + _G_AUX).to(tl.pointer_type(tl.int16))
    if MODE == 6:
        aux_f = tl.load(row + _G_AUX).to(tl.pointer_type(tl.float32))
    positive = tl.load(row + _P_POSITIVE)
    negative = tl.load(row + _P_NEGATIVE)
    delta = tl.load(row + _G_DELTA).to(tl.int32).to(tl.float32, bitcast=True)
    drop_key = tl.load(row + _P_DROP_KEY).to(tl.uint64, bitcast=True)
    drop_cut = tl.load(row + _P_DROP_CUT).to(tl.uint64, bitcast=True)

    # Carries from tile to tile. Block-wide reductions cost a barrier each, so a tile does two:
    # the entry, long-form and bad-entry counts packed into one int64 sum, and the Σ r.
    seen = tl.zeros((), tl.int64)  # terminators so far
    longs = tl.zeros((), tl.int64)  # long-form remainders so far
    rsum = tl.zeros((), tl.int64)  # Σ r so far
    bad = tl.zeros((), tl.int64)  # entries whose position fell outside the chunk
    lanes = tl.arange(0, BLOCK).to(tl.int64)
    for start in range(qpos, qend, BLOCK):
        g = start + lanes
        inside = g < qend
        word = tl.load(words_ptr + unary_at + (g >> 6), mask=inside, other=0).to(tl.uint64, bitcast=True)
        term = inside & (((word >> (g & 63).to(tl.uint64)) & 1) != 0)
        i = seen + tl.cumsum(term.to(tl.int32), 0).to(tl.int64) - 1  # the entry this terminator ends (chunk-local)
        valid = term & (i < count)
        e = first + i
        lpos = e * width
        lw = lpos >> 6
        off = (lpos & 63).to(tl.uint64)
        lo = tl.load(words_ptr + low_at + lw, mask=valid & (lw < n_low), other=0).to(tl.uint64, bitcast=True)
        hi = tl.load(words_ptr + low_at + lw + 1, mask=valid & (lw + 1 < n_low), other=0).to(tl.uint64, bitcast=True)
        x = ((lo >> off) | ((hi << 1) << (63 - off))).to(tl.int64, bitcast=True) & mask_low
        long_form = valid & (x >= cut)
        h = hpos + longs + tl.cumsum(long_form.to(tl.int32), 0).to(tl.int64) - 1
        hword = tl.load(words_ptr + high_at + (h >> 6), mask=long_form & (h < hend) & ((h >> 6) < n_high),
                        other=0).to(tl.uint64, bitcast=True)
        r = tl.where(valid, x + ((hword >> (h & 63).to(tl.uint64)) & 1).to(tl.int64) * half, 0)
        if SMALL_M:  # every r < 2**19: the tile's prefix sums fit int32
            r_before = tl.cumsum(r.to(tl.int32), 0).to(tl.int64)
        else:
            r_before = tl.cumsum(r, 0)
        zeros = g - qpos - i  # Σ q over this entry and the ones before it
        pos = base + m * tl.minimum(zeros, qmax) + rsum + r_before + i
        ok = valid & (zeros <= qmax) & (pos >= base) & (pos < end)  # >= base: no wrapped sum slips in
        counts = tl.sum(term.to(tl.int64) | (long_form.to(tl.int64) << 16) | ((valid & ~ok).to(tl.int64) << 32), 0)
        seen += counts & 0xFFFF
        longs += (counts >> 16) & 0xFFFF
        bad += counts >> 32
        rsum += tl.sum(r, 0)
        if MODE != 0:
            sword = tl.load(words_ptr + signs_at + (e >> 6), mask=ok & ((e >> 6) < n_signs),
                            other=0).to(tl.uint64, bitcast=True)
            neg = ((sword >> (e & 63).to(tl.uint64)) & 1) != 0
            if DROPS:
                ok = ok & ((_splitmix64(drop_key + e.to(tl.uint64, bitcast=True)) >> 1) >= drop_cut)
            if MODE == 5:
                pattern = tl.where(neg, negative, positive)
                if WIDE:
                    tl.store(out32 + pos, pattern.to(tl.int32), mask=ok)
                else:
                    tl.store(out16 + pos, pattern.to(tl.int16), mask=ok)
            elif MODE == 2:
                w32 = tl.load(out32 + pos, mask=ok, other=0).to(tl.float32, bitcast=True)
                w32 = _add_as_cpu(w32, tl.where(neg, -delta, delta))
                tl.store(out32 + pos, w32.to(tl.int32, bitcast=True), mask=ok)
            elif MODE == 3:
                w16 = tl.load(out16 + pos, mask=ok, other=0).to(tl.uint16, bitcast=True).to(tl.uint32)
                wf = _add_as_cpu((w16 << 16).to(tl.float32, bitcast=True), tl.where(neg, -delta, delta))
                tl.store(out16 + pos, _f32_to_bf16_bits(wf).to(tl.int16), mask=ok)
            elif MODE == 4:
                w16 = tl.load(out16 + pos, mask=ok, other=0).to(tl.float16, bitcast=True)
                wf = _add_as_cpu(w16.to(tl.float32), tl.where(neg, -delta, delta))
                tl.store(out16 + pos, _f32_to_f16_bits(wf).to(tl.int16), mask=ok)
            elif MODE == 6:
                elected_negative = tl.load(aux_f + pos, mask=ok, other=0.0) < 0
                agree = ok & (elected_negative == neg)
                w32 = tl.load(out32 + pos, mask=agree, other=0).to(tl.float32, bitcast=True)
                w32 = w32 + tl.where(neg, -delta, delta)
                tl.store(out32 + pos, w32.to(tl.int32, bitcast=True), mask=agree)
                n32 = tl.load(out32 + numel + pos, mask=agree, other=0).to(tl.float32, bitcast=True) + 1.0
                tl.store(out32 + numel + pos, n32.to(tl.int32, bitcast=True), mask=agree)
            elif MODE == 7:
                if WIDE:
                    tl.store(aux32 + e, tl.load(out32 + pos, mask=ok, other=0), mask=ok)
                else:
                    tl.store(aux16 + e, tl.load(out16 + pos, mask=ok, other=0), mask=ok)
            elif MODE == 8:
                if WIDE:
                    tl.store(out32 + pos, tl.load(aux32 + e, mask=ok, other=0), mask=ok)
                else:
                    tl.store(out16 + pos, tl.load(aux16 + e, mask=ok, other=0), mask=ok)

    # With exactly `count` terminators, the last at bit qend - 1, the last entry's position follows
    # from the carries: Σ q = (qend - 1 - qpos) - (count - 1).
    last_word = tl.load(words_ptr + unary_at + ((qend - 1) >> 6), mask=qend > qpos, other=0).to(tl.uint64, bitcast=True)
    ends_on_one = (qend > qpos) & (((last_word >> ((qend - 1) & 63).to(tl.uint64)) & 1) != 0)
    last_pos = base + m * tl.minimum(qend - qpos - count, qmax) + rsum + count - 1
    code = tl.zeros((), tl.int64)
    code = tl.where((c + 1 < n_chunks) & (last_pos + 1 != end), 6, code)
    code = tl.where(bad != 0, 3, code)
    code = tl.where(longs != hend - hpos, 5, code)
    code = tl.where((seen > count) | ~ends_on_one, 4, code)
    code = tl.where(seen < count, 1, code)
    tl.store(status_ptr + j, code)

