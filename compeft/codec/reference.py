"""A deliberately simple reference encoder and decoder of the "ternary-golomb" payload.

This module exists to check :mod:`compeft.codec.golomb` and its Numba kernels against an
independent implementation: it shares no code with them, walks the streams one entry at a time
with :mod:`bitarray`, and favours being obviously right over being fast. Never use it on real
checkpoints.

Payload layout (all words are little-endian u64; bit ``i`` of a stream is bit ``i % 64`` of word
``i // 64``, i.e. a little-endian bitarray of the stream's bytes; padding bits are zero)::

    chunk table   n_chunks = ceil(nnz / chunk_size) rows of (base position, unary bit offset,
                  high bit offset) of the chunk's first entry
    unary stream  ceil(unary_bits / 64) words: per entry, q zero bits then a one bit
    low stream    ceil(nnz * w / 64) words, w = max(b - 1, 0): entry i's w-bit low field at bit i * w
    high stream   ceil(high_bits / 64) words: one bit per long-form entry, in entry order
    sign stream   ceil(nnz / 64) words: bit i = 1 when entry i is negative

An entry ``v`` is kept when ``v != 0`` and ``|v| >= threshold`` (compared in float32). Gap ``g`` of
entry ``i`` is ``p_i - p_(i-1) - 1`` (``p_0`` for the first); ``q = g // m``, ``r = g % m``. With
``b = ceil(log2 m)`` (0 for m = 1), ``cut = 2**b - m`` and ``half = 2**(b-1) - cut``: ``r < cut``
(short form) has the low field ``r`` and no high bit; otherwise (long form) ``j = r - cut`` has the
low field ``cut + j % half`` and the high bit ``j // half``. m = 1 writes neither; m = 2 (w = 0,
cut = 0) writes one high bit, ``r``, per entry. Fields are written least significant bit first.
"""

from __future__ import annotations

import math
import operator
import struct
from typing import Sequence

import numpy as np
from bitarray import bitarray
from bitarray.util import ba2int, zeros

from ..errors import CorruptPayloadError

WORD_BITS = 64

# Significant bits (including the implicit one), smallest exponent of the quantum and largest
# finite value of each compressible dtype.
_FORMATS = {
    "F32": (24, -149, (2 - 2.0 ** -23) * 2.0 ** 127),
    "F16": (11, -24, 65504.0),
    "BF16": (8, -133, (2 - 2.0 ** -7) * 2.0 ** 127),
}


# ---------------------------------------------------------------------------------------------
# small helpers


def _words(nbits: int) -> int:
    """Number of 64-bit words that hold ``nbits`` bits."""
    return -(-nbits // WORD_BITS)


def _width(m: int) -> int:
    """b = ceil(log2 m), computed by counting (0 for m = 1)."""
    b = 0
    while 2 ** b < m:
        b += 1
    return b


def _pad_to_words(bits: bitarray) -> bytes:
    """The stream's bytes, zero-padded to whole 64-bit words."""
    padded = bits.copy()
    padded.extend(zeros(_words(len(bits)) * WORD_BITS - len(bits), endian="little"))
    return padded.tobytes()


def _stream(data: bytes) -> bitarray:
    bits = bitarray(endian="little")
    bits.frombytes(data)
    return bits


def round_to_dtype(x: float, dtype: str) -> float:
    """``x`` (a Python float) rounded to the nearest ``dtype`` value, ties to even, overflowing to
    infinity; computed with exact float arithmetic (frexp / ldexp / round), not bit tricks."""
    if dtype not in _FORMATS:
        raise ValueError(f"unsupported dtype {dtype!r}")
    if math.isnan(x) or math.isinf(x) or x == 0.0:
        return x
    precision, min_exp, largest = _FORMATS[dtype]
    _, e = math.frexp(x)  # |x| = f * 2**e with 0.5 <= f < 1
    quantum = max(e - precision, min_exp)  # value of the last kept bit
    rounded = math.ldexp(round(math.ldexp(x, -quantum)), quantum)  # round() of a float: half to even
    if abs(rounded) > largest:
        rounded = math.inf
    return math.copysign(abs(rounded), x)  # keeps the sign of values that round to zero


# ---------------------------------------------------------------------------------------------
# encoding


def kept_entries(values: Sequence[float], threshold: float) -> tuple[list[int], list[int]]:
    """Positions and sign bits (1 = negative) of the entries kept at ``threshold`` (float32)."""
    vals = np.asarray(values, dtype=np.float32).reshape(-1).tolist()  # Python floats, float32-exact
    thr = float(np.float32(threshold))
    positions: list[int] = []
    signs: list[int] = []
    for i, v in enumerate(vals):
        if v != 0.0 and abs(v) >= thr:  # False for NaN
            positions.append(i)
            signs.append(1 if v < 0.0 else 0)
    return positions, signs


def _remainder_code(r: int, m: int) -> tuple[int, int, int | None]:
    """(low field, low width w, high bit or None for the short form) of remainder ``r``."""
    b = _width(m)
    if b == 0:
        return 0, 0, None
    cut = 2 ** b - m
    half = 2 ** (b - 1) - cut
    if r < cut:
        return r, b - 1, None
    j = r - cut
    return cut + j % half, b - 1, j // half


def encode_payload(values: Sequence[float], threshold: float, golomb_m: int,
                   chunk_size: int) -> tuple[bytes, int, int, int]:
    """Encode ``values`` with Golomb parameter ``golomb_m``; returns
    (payload, nnz, unary_bits, high_bits)."""
    if golomb_m < 1 or chunk_size < 1:
        raise ValueError("golomb_m and chunk_size must be at least 1")
    positions, signs = kept_entries(values, threshold)
    table: list[tuple[int, int, int]] = []
    unary = bitarray(endian="little")
    low = bitarray(endian="little")
    high = bitarray(endian="little")
    sign_bits = bitarray(endian="little")
    previous = -1
    for k, (p, s) in enumerate(zip(positions, signs)):
        if k % chunk_size == 0:
            table.append((previous + 1, len(unary), len(high)))
        gap = p - previous - 1
        previous = p
        q, r = divmod(gap, golomb_m)
        unary.extend(zeros(q, endian="little"))
        unary.append(1)
        field, width, high_bit = _remainder_code(r, golomb_m)
        assert len(low) == k * width  # fixed width: entry k's field starts at bit k * width
        for bit in range(width):
            low.append((field >> bit) & 1)
        if high_bit is not None:
            high.append(high_bit)
        sign_bits.append(s)
    table_bytes = b"".join(struct.pack("<3Q", *row) for row in table)
    payload = (table_bytes + _pad_to_words(unary) + _pad_to_words(low) + _pad_to_words(high)
               + _pad_to_words(sign_bits))
    return payload, len(positions), len(unary), len(high)


# ---------------------------------------------------------------------------------------------
# decoding


def _fail(message: str) -> CorruptPayloadError:
    return CorruptPayloadError(f"reference decoder: {message}")


def decode_positions_signs(payload: bytes, *, nnz: int, numel: int, golomb_m: int, chunk_size: int,
                           unary_bits: int, high_bits: int,
                           strict_padding: bool = True) -> tuple[list[int], list[int]]:
    """Decode the kept positions (ascending) and their sign bits (1 = negative).

    Walks the whole payload sequentially and requires every chunk table row to equal what an
    encoder would have written at that point. Raises :class:`CorruptPayloadError` on any
    inconsistency. With ``strict_padding`` the padding bits after each stream must be zero.
    """
    nnz, numel, golomb_m, chunk_size, unary_bits, high_bits = (
        operator.index(x) for x in (nnz, numel, golomb_m, chunk_size, unary_bits, high_bits))
    if min(nnz, numel, unary_bits, high_bits) < 0:
        raise _fail("negative count in the header")
    if golomb_m < 1 or chunk_size < 1:
        raise _fail("golomb_m and chunk_size must be at least 1")
    if nnz > numel:
        raise _fail(f"nnz {nnz} exceeds numel {numel}")
    b = _width(golomb_m)
    width = max(b - 1, 0)
    cut = 2 ** b - golomb_m
    half = 2 ** (b - 1) - cut if b > 0 else 0
    data = bytes(payload)
    n_chunks = -(-nnz // chunk_size)
    sizes = [3 * n_chunks * 8, _words(unary_bits) * 8, _words(nnz * width) * 8, _words(high_bits) * 8,
             _words(nnz) * 8]
    if len(data) != sum(sizes):
        raise _fail(f"payload is {len(data)} bytes, the header needs {sum(sizes)}")
    starts = [sum(sizes[:i]) for i in range(5)]
    table = [struct.unpack_from("<3Q", data, starts[0] + 24 * c) for c in range(n_chunks)]
    unary, low, high, sign_bits = (_stream(data[starts[i]:starts[i] + sizes[i]]) for i in range(1, 5))
    if strict_padding:
        for name, bits, used in (("unary", unary, unary_bits), ("low", low, nnz * width),
                                 ("high", high, high_bits), ("sign", sign_bits, nnz)):
            if bits[used:].any():
                raise _fail(f"{name} stream padding bits are not zero")

    positions: list[int] = []
    signs: list[int] = []
    nxt = 0  # position after the previous kept entry
    qpos = 0
    hpos = 0
    for k in range(nnz):
        if k % chunk_size == 0:
            row = table[k // chunk_size]
            if row != (nxt, qpos, hpos):
                raise _fail(f"chunk {k // chunk_size} table row {row} != decoded state {(nxt, qpos, hpos)}")
        try:
            one = unary.index(1, qpos, unary_bits)
        except ValueError:
            raise _fail(f"unary stream ends inside entry {k}") from None
        q = one - qpos
        qpos = one + 1
        r = 0
        if b > 0:
            x = ba2int(low[k * width:(k + 1) * width]) if width > 0 else 0
            if x < cut:
                r = x
            else:
                if hpos >= high_bits:
                    raise _fail(f"high stream ends inside entry {k}")
                r = x + high[hpos] * half
                hpos += 1
        position = nxt + q * golomb_m + r
        if position >= numel:
            raise _fail(f"entry {k} decodes to position {position}, past the {numel} elements")
        positions.append(position)
        signs.append(sign_bits[k])
        nxt = position + 1
    if qpos != unary_bits:
        raise _fail(f"unary stream has {unary_bits} bits but the entries use {qpos}")
    if hpos != high_bits:
        raise _fail(f"high stream has {high_bits} bits but the entries use {hpos}")
    return positions, signs


def decode_dense(payload: bytes, *, nnz: int, numel: int, golomb_m: int, chunk_size: int, unary_bits: int,
                 high_bits: int, scale: float, dtype: str, strict_padding: bool = True) -> np.ndarray:
    """The dense tensor: kept entries are ``±dtype(scale)``, the rest zero; float32[numel] holding
    the dtype-rounded values."""
    if dtype not in _FORMATS:
        raise ValueError(f"unsupported dtype {dtype!r}")
    positions, signs = decode_positions_signs(
        payload, nnz=nnz, numel=numel, golomb_m=golomb_m, chunk_size=chunk_size, unary_bits=unary_bits,
        high_bits=high_bits, strict_padding=strict_padding)
    value = round_to_dtype(float(np.float32(scale)), dtype)
    out = np.zeros(numel, dtype=np.float32)
    for p, s in zip(positions, signs):
        out[p] = -value if s else value
    return out


# ---------------------------------------------------------------------------------------------
# the packed layout (spec/FORMAT.md 5.5): the same four streams, bit-contiguous, no table


def pack_payload(payload: bytes, *, nnz: int, golomb_m: int, unary_bits: int, high_bits: int) -> bytes:
    """The ``ternary-golomb-packed`` payload of a one-chunk ``ternary-golomb`` payload: its four
    streams' bits back to back (table and word padding dropped), zero bits up to a byte."""
    width = _width(golomb_m) - 1 if golomb_m > 1 else 0
    bits = _stream(payload)
    at = WORD_BITS * 3 * (1 if nnz else 0)  # the one table row
    packed = bitarray(endian="little")
    for n in (unary_bits, nnz * width, high_bits, nnz):
        packed.extend(bits[at:at + n])
        at += _words(n) * WORD_BITS
    packed.fill()
    return packed.tobytes()


def unpack_payload(packed: bytes, *, nnz: int, golomb_m: int, unary_bits: int, high_bits: int) -> bytes:
    """The one-chunk ``ternary-golomb`` payload a packed one means: a table row of zeros, then each
    stream from a word boundary (what :func:`decode_positions_signs` reads)."""
    width = _width(golomb_m) - 1 if golomb_m > 1 else 0
    sizes = (unary_bits, nnz * width, high_bits, nnz)
    bits = _stream(packed)
    if len(packed) != -(-sum(sizes) // 8):
        raise _fail(f"packed payload is {len(packed)} bytes, its streams need {-(-sum(sizes) // 8)}")
    out = struct.pack("<3Q", 0, 0, 0) if nnz else b""
    at = 0
    for n in sizes:
        out += _pad_to_words(bits[at:at + n])
        at += n
    return out
