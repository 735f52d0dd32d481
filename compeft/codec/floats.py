"""float16 / bfloat16 bit conversions for the Numba kernels (Numba has no 16-bit float type on the CPU).

Rounding is to nearest even, as torch and numpy round; NaN handling is spelled out per function
(the GPU kernels in :mod:`compeft.codec.triton_kernels` reproduce it bit for bit).
"""

from __future__ import annotations

import numpy as np
from numba import njit

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
