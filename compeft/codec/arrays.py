"""Arrays handed to the parallel decode drivers as an address table instead of a Numba typed list.

A driver decodes into one output array per tensor. Numba's typed ``List`` would carry them, but
its methods are compiled at run time in every process (they are not in Numba's on-disk cache):
about 0.8 s before a fresh process decodes its first byte, and ~0.3 ms per array appended after
that. Instead the caller passes an int64 table, one row ``(address, length)`` per array, built by
:func:`address_table` from arrays it has checked (one dtype, 1-D, C-contiguous, writeable) and
keeps alive for the call; inside a kernel :func:`array_at` turns row ``t`` back into an ordinary
1-D array of that length, so every access stays bounds-checked under ``NUMBA_BOUNDSCHECK``.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from numba import carray, njit, types
from numba.extending import intrinsic

from ..errors import InvalidArgumentError

ADDRESS, LENGTH = 0, 1  # the columns of an address table


@intrinsic
def pointer_like(typingctx, address, like):  # type: ignore[no-untyped-def]
    """A pointer to ``like``'s element type at the integer ``address``."""
    if not isinstance(address, types.Integer) or not isinstance(like, types.Array):
        return None
    signature = types.CPointer(like.dtype)(address, like)

    def codegen(context, builder, sig, args):  # type: ignore[no-untyped-def]
        return builder.inttoptr(args[0], context.get_value_type(sig.return_type))

    return signature, codegen


@njit(cache=True, inline="always")
def array_at(table, t, like):  # type: ignore[no-untyped-def]
    """Row ``t`` of an address table as a 1-D array of ``like``'s dtype."""
    return carray(pointer_like(table[t, ADDRESS], like), (table[t, LENGTH],))


def address_table(arrays: Sequence[np.ndarray], dtype: np.dtype, what: str) -> np.ndarray:
    """int64[len(arrays), 2]: each array's data address and length, after checking that each is a
    1-D, C-contiguous, writeable ndarray of ``dtype`` (the kernels write through these addresses;
    the caller keeps ``arrays`` alive until the kernel returns)."""
    table = np.zeros((len(arrays), 2), dtype=np.int64)
    for t, a in enumerate(arrays):
        if (not isinstance(a, np.ndarray) or a.dtype != dtype or a.ndim != 1 or not a.flags.c_contiguous
                or not a.flags.writeable):
            raise InvalidArgumentError(f"{what} {t} must be a 1-D, contiguous, writeable {dtype} array")
        table[t, ADDRESS] = a.__array_interface__["data"][0]
        table[t, LENGTH] = a.size
    return table
