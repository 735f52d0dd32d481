"""The check pass by tallies: a chunk's verdict without walking its entries one by one.

``kernels.walk_chunk`` accepts a chunk exactly when its entries' positions stay inside the chunk
and its streams end where the next chunk starts. Positions only grow, so only the last one matters,
and it is a sum: base + m·Σq + Σr + (count − 1). Each term is a tally over a stream:

* the unary stream holds one 1 per entry, so the walk meets no overrun and ends at ``qend`` exactly
  when the range [qpos, qend) holds ``count`` ones and its last bit is one; Σq is then its zeros;
* the low fields are at fixed places: Σx and the number of long forms (x ≥ cut) are a loop with no
  carried dependency but the sums;
* each long form takes the next high bit, so the walk ends at ``hend`` exactly when there are
  ``hend − hpos`` long forms, and those bits add ``half`` times their popcount to Σr.

``kernels.tally_chunk`` puts these together: it returns ``kernels.OK`` exactly when
``kernels.check_chunk`` does (tests/test_tally.py checks this on random and corrupted payloads),
except that chunks whose sums could overflow int64 (m near its 2^48 limit) are left to the walk;
for any other chunk a non-zero code that need not be the walk's, so the check driver walks a
rejected chunk again for the exact code.
"""

from __future__ import annotations

import numpy as np
from numba import njit, types
from numba.extending import intrinsic

U = np.uint64


@intrinsic
def popcount(typingctx, word):  # type: ignore[no-untyped-def]
    """The number of one bits of a uint64 (LLVM's ctpop: one instruction where the CPU has it)."""
    if word != types.uint64:
        return None

    def codegen(context, builder, sig, args):  # type: ignore[no-untyped-def]
        return builder.ctpop(args[0])

    return types.uint64(types.uint64), codegen


@njit(cache=True, inline="always")
def ones_between(words, start, stop):
    """The one bits of bit range [start, stop) of ``words`` (0 <= start <= stop <= 64 · len)."""
    if start >= stop:
        return np.int64(0)
    first, last = start >> 6, (stop - 1) >> 6
    low = np.uint64(0xFFFFFFFFFFFFFFFF) << U(start & 63)
    high = np.uint64(0xFFFFFFFFFFFFFFFF) >> U(63 - ((stop - 1) & 63))
    if first == last:
        return np.int64(popcount(words[U(first)] & low & high))
    total = np.int64(popcount(words[U(first)] & low)) + np.int64(popcount(words[U(last)] & high))
    for w in range(first + 1, last):
        total += np.int64(popcount(words[U(w)]))
    return total


@njit(cache=True, inline="always")
def low_sums(lwords, first, count, width, cut):
    """(Σx, number of x ≥ cut) over the ``width``-bit low fields of entries first … first+count−1."""
    total = np.int64(0)
    longs = np.int64(0)
    mask = (np.uint64(1) << U(width)) - np.uint64(1)
    top = lwords.shape[0] - 1
    for i in range(count):
        lpos = (first + i) * width
        lw = lpos >> 6
        off = U(lpos & 63)
        # the next word shifted in twice (by 1, then 63 − off): no shift by 64 when off is 0
        x = np.int64(((lwords[U(lw)] >> off) | ((lwords[U(min(lw + 1, top))] << U(1)) << (U(63) - off))) & mask)
        total += x
        longs += np.int64(x >= cut)
    return total, longs
