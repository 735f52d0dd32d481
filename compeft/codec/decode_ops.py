"""The decode operations of :mod:`compeft.codec.kernels`, as (begin, fill, visit) triples of Numba functions.

The chunk walker (``kernels.walk_chunk``) calls ``begin(op, base, end, numel)`` once per chunk,
after checking its streams (False: the output cannot take the chunk's range ``[base, end)``);
then, block by block, ``fill(op, start, stop)`` over the part of that range up to the block's last
position (dense decoding zeroes it there, while it is in the cache, so each output byte is written
from the cache once) and ``visit(op, at, e, negative)`` for every entry ``e`` of the block, in
order, at position ``at`` (uint64); and ``fill`` once more up to ``end``. ``op`` is the
operation's tuple, ``(out, ...)`` as each function notes. All are inlined into the walker, which
is inlined into one cached kernel per operation.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from .floats import bf16_bits_to_f32, f32_to_bf16_bits, f32_to_f16_bits

U = np.uint64  # array indices known to be in range: unsigned, so Numba emits no wraparound test


@njit(cache=True, inline="always")
def splitmix64(x):
    """The splitmix64 output function (Steele et al. 2014): a well-mixed uint64 of a uint64."""
    z = np.uint64(x) + np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


@njit(cache=True, inline="always")
def begin_nothing(op, base, end, numel):
    return True


@njit(cache=True, inline="always")
def begin_out(op, base, end, numel):
    return end <= op[0].shape[0]


@njit(cache=True, inline="always")
def begin_ties(op, base, end, numel):  # op: (out, aux, ...)
    return end <= op[1].shape[0] and op[0].shape[0] >= 2 * numel


@njit(cache=True, inline="always")
def fill_nothing(op, start, stop):
    pass


@njit(cache=True, inline="always")
def fill_zeros(op, start, stop):  # op: (out, ...); [start, stop) lies inside the range begin checked
    op[0][start:stop] = 0  # a slice store compiles to a vector loop; an indexed loop does not


@njit(cache=True, inline="always")
def visit_nothing(op, at, e, negative):
    pass


@njit(cache=True, inline="always")
def visit_pattern(op, at, e, negative):  # op: (out, positive, positive ^ negative)
    op[0][at] = op[1] ^ (negative * op[2])


@njit(cache=True, inline="always")
def add_f32(out, at, step):
    out[at] = np.float32(np.uint32(out[at]).view(np.float32) + step).view(np.uint32)


@njit(cache=True, inline="always")
def signed(step, negative):
    """``-step`` when ``negative`` (0 or 1), else ``step``, bit for bit, without a branch: the signs
    of kept entries are close to random, so a branch there is mispredicted about half the time
    (measured: 3-6 ns per entry, more than the whole walk's other work)."""
    return np.uint32(np.float32(step).view(np.uint32) ^ (np.uint32(negative) << np.uint32(31))).view(np.float32)


@njit(cache=True, inline="always")
def visit_add_f32(op, at, e, negative):  # op: (out, step)
    add_f32(op[0], at, signed(op[1], negative))


@njit(cache=True, inline="always")
def visit_add_bf16(op, at, e, negative):  # op: (out, step)
    out = op[0]
    out[at] = f32_to_bf16_bits(bf16_bits_to_f32(out[at]) + signed(op[1], negative))


@njit(cache=True, inline="always")
def visit_add_f16(op, at, e, negative):  # op: (out, step, F16_TO_F32)
    out = op[0]
    out[at] = f32_to_f16_bits(op[2][U(out[at])] + signed(op[1], negative))


@njit(cache=True, inline="always")
def either(keep, value, other):
    """``value`` when ``keep``, else ``other`` (float32, bit for bit), through a mask instead of a
    branch: whether an entry counts (TIES's sign election, DARE's drops) is close to random, and a
    branch on it, waiting on the load of the elected sum, cost more than the whole walk (measured:
    the TIES kernel 19.9 -> 8.9 ns per entry on one thread)."""
    mask = np.uint32(np.uint32(0) - np.uint32(keep))
    return np.uint32((np.float32(value).view(np.uint32) & mask)
                     | (np.float32(other).view(np.uint32) & ~mask)).view(np.float32)


@njit(cache=True, inline="always")
def add_agreeing(op, at, negative, keep):  # op: (out, aux, step, numel)
    nothing = np.float32(-0.0)  # x + -0.0 is x, bit for bit, for every x (+0.0 would turn -0.0 into +0.0)
    add_f32(op[0], at, either(keep, signed(op[2], negative), nothing))
    add_f32(op[0], at + U(op[3]), either(keep, np.float32(1.0), nothing))  # the count, in the second half


@njit(cache=True, inline="always")
def elected(op, at, negative):  # op: (out, aux, ...): the entry's sign is the one its sum elected (a zero sum elects +)
    return np.uint32(op[1][at] < 0) == np.uint32(negative)


@njit(cache=True, inline="always")
def visit_ties(op, at, e, negative):  # op: (out, aux, step, numel)
    add_agreeing(op, at, negative, elected(op, at, negative))


@njit(cache=True, inline="always")
def dropped(key, cut, e):
    """DARE: whether entry ``e`` is dropped (uint64 ``key`` and ``cut``, see ``P_DROP_*``)."""
    return (cut != 0) & ((splitmix64(key + np.uint64(e)) >> np.uint64(1)) < cut)


@njit(cache=True, inline="always")
def visit_add_f32_dare(op, at, e, negative):  # op: (out, step, drop key, drop cut)
    add_f32(op[0], at, either(not dropped(op[2], op[3], e), signed(op[1], negative), np.float32(-0.0)))


@njit(cache=True, inline="always")
def visit_ties_dare(op, at, e, negative):  # op: (out, aux, step, numel, drop key, drop cut)
    add_agreeing(op, at, negative, elected(op, at, negative) & (not dropped(op[4], op[5], e)))
