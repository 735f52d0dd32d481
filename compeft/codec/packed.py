"""The Numba kernel that expands a ``ternary-golomb-packed`` payload (spec/FORMAT.md 5.5) into the
word layout every decoder reads (:func:`compeft.codec.golomb.unpack` checks the lengths first)."""

from __future__ import annotations

import numpy as np
from numba import njit


@njit(cache=True)
def unpack_streams(src, bits, out, starts):
    """Copy the bit-contiguous streams of a packed payload into words: ``src`` (uint64) holds the
    payload's bytes from its first word, zero-filled, with at least one word to spare; stream s
    holds ``bits[s]`` bits and goes to ``out[starts[s]:]`` from bit 0, and bits past its end are
    zero (the caller checked that the streams fit in the payload)."""
    at = 0
    for s in range(bits.size):
        nbits = bits[s]
        for j in range((nbits + 63) >> 6):
            first = at + 64 * j
            k = first >> 6
            shift = np.uint64(first & 63)
            v = src[k] >> shift
            if shift:
                v |= src[k + 1] << (np.uint64(64) - shift)
            left = nbits - 64 * j
            if left < 64:
                v &= (np.uint64(1) << np.uint64(left)) - np.uint64(1)
            out[starts[s] + j] = v
        at += nbits
