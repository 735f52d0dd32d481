"""float16 / bfloat16 bit conversions for the Numba kernels (Numba has no 16-bit float type on the CPU).

Rounding is to nearest even, as torch and numpy round; NaN handling is spelled out per function
(the GPU kernels in :mod:`compeft.codec.triton_kernels` reproduce it bit for bit).
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from .threads import serialized

F16_TO_F32 = np.arange(65536, dtype=np.uint32).astype(np.uint16).view(np.float16).astype(np.float32)


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


DIFFERENCE_BLOCKS = 64  # the split of a difference over threads


@serialized
@njit(cache=True, parallel=True, nogil=True)
def difference_f32(a, a_bf16, b, b_bf16, f16_lut, out):
    """out = float32(a) - float32(b) for 16-bit floats given as their uint16 bits (bfloat16 where
    ``*_bf16``, else float16 through ``f16_lut``): exact widening, one IEEE subtraction, as torch's
    ``a.float() - b.float()``, in one pass."""
    n = out.shape[0]
    for j in prange(DIFFERENCE_BLOCKS):
        for i in range(n * j // DIFFERENCE_BLOCKS, n * (j + 1) // DIFFERENCE_BLOCKS):
            x = bf16_bits_to_f32(a[i]) if a_bf16 else f16_lut[a[i]]
            y = bf16_bits_to_f32(b[i]) if b_bf16 else f16_lut[b[i]]
            out[i] = x - y
