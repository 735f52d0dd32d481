"""The ternary-golomb codec: encode kept entries of a flat float32 array, validate a payload, decode.

The public functions here validate every length and table entry in Python before a Numba kernel
touches a buffer (spec/FORMAT.md section 5 lists the invariants checked).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..errors import CorruptPayloadError
from ..format.header import MAX_GOLOMB_M, golomb_payload_length, golomb_width
from . import kernels

DEFAULT_CHUNK_SIZE = 16384


@dataclass(frozen=True)
class GolombStreams:
    """The four parts of a ternary-golomb payload, as numpy views."""

    nnz: int
    golomb_m: int
    chunk_size: int
    unary_bits: int
    remainder_bits: int
    table: np.ndarray  # int64[n_chunks, 3]: base position, unary bit offset, remainder bit offset
    unary: np.ndarray  # uint64[ceil(unary_bits / 64)]
    remainders: np.ndarray  # uint64[ceil(remainder_bits / 64)]
    signs: np.ndarray  # uint64[ceil(nnz / 64)]

    def payload_parts(self) -> list[memoryview]:
        """The payload bytes in file order (little-endian words)."""
        return [memoryview(np.ascontiguousarray(a).astype("<u8", copy=False)).cast("B")
                for a in (self.table.reshape(-1), self.unary, self.remainders, self.signs)]

    @property
    def payload_length(self) -> int:
        return golomb_payload_length(self.nnz, self.chunk_size, self.unary_bits, self.remainder_bits)


def golomb_candidates(nnz: int, numel: int) -> np.ndarray:
    """Golomb parameters worth costing for ``nnz`` kept of ``numel``: the geometric optimum
    (Gallager & van Voorhis 1975) and its neighbours, including the nearest powers of two."""
    if nnz == 0 or nnz >= numel:
        return np.array([1], dtype=np.int64)
    p = nnz / numel
    best = max(1, math.ceil(math.log(2 - p) / -math.log1p(-p)))
    low_pow = 1 << (best.bit_length() - 1)
    values = {max(1, best - 1), best, best + 1, low_pow, low_pow * 2}
    return np.array(sorted(v for v in values if v <= MAX_GOLOMB_M), dtype=np.int64)


def count_kept(values: np.ndarray, threshold: float) -> int:
    """Number of entries with ``|v| >= threshold`` and ``v != 0``."""
    costs = np.zeros((1, 2), dtype=np.int64)
    return int(kernels.count_gap_costs(values, np.float32(threshold), np.ones(1, np.int64), costs))


def encode(values: np.ndarray, threshold: float, chunk_size: int = DEFAULT_CHUNK_SIZE) -> GolombStreams:
    """Encode the positions and signs of the kept entries of ``values`` (float32, flat)."""
    values = np.ascontiguousarray(values, dtype=np.float32).reshape(-1)
    thr = np.float32(threshold)
    nnz = count_kept(values, threshold)
    candidates = golomb_candidates(nnz, values.size)
    costs = np.zeros((candidates.size, 2), dtype=np.int64)
    kernels.count_gap_costs(values, thr, candidates, costs)
    best = int(np.argmin(costs.sum(axis=1)))  # ties: the smallest m (candidates are sorted)
    m = int(candidates[best])
    unary_bits, remainder_bits = int(costs[best, 0]), int(costs[best, 1])
    n_chunks = -(-nnz // chunk_size)
    table = np.zeros((n_chunks, 3), dtype=np.int64)
    unary = np.zeros(-(-unary_bits // 64), dtype=np.uint64)
    remainders = np.zeros(-(-remainder_bits // 64), dtype=np.uint64)
    signs = np.zeros(-(-nnz // 64), dtype=np.uint64)
    got = kernels.encode_golomb(values, thr, m, chunk_size, table, unary, remainders, signs)
    assert got == (nnz, unary_bits, remainder_bits), "encoder passes disagree"
    return GolombStreams(nnz, m, chunk_size, unary_bits, remainder_bits, table, unary, remainders, signs)


def parse_payload(payload: bytes | bytearray | memoryview | np.ndarray, *, nnz: int, numel: int, golomb_m: int,
                  chunk_size: int, unary_bits: int, remainder_bits: int, where: str, path: object) -> GolombStreams:
    """Split a payload into its streams and check the chunk table (no kernel runs here)."""
    expected = golomb_payload_length(nnz, chunk_size, unary_bits, remainder_bits)
    size = memoryview(payload).nbytes
    if size != expected:
        raise CorruptPayloadError(f"{where}: payload is {size} bytes, expected {expected}", path)
    words = np.frombuffer(payload, dtype="<u8") if not isinstance(payload, np.ndarray) else payload.view("<u8")
    n_chunks = -(-nnz // chunk_size)
    sizes = [3 * n_chunks, -(-unary_bits // 64), -(-remainder_bits // 64), -(-nnz // 64)]
    bounds = np.cumsum([0, *sizes])
    table = words[bounds[0]:bounds[1]].view(np.int64).reshape(n_chunks, 3)
    streams = GolombStreams(nnz, golomb_m, chunk_size, unary_bits, remainder_bits, table,
                            *(words[bounds[i]:bounds[i + 1]] for i in (1, 2, 3)))
    _check_table(streams, numel, where, path)
    return streams


def _check_table(s: GolombStreams, numel: int, where: str, path: object) -> None:
    if s.nnz == 0:
        return
    base, qoff, roff = s.table[:, 0], s.table[:, 1], s.table[:, 2]
    width = golomb_width(s.golomb_m)
    counts = np.full(base.size, s.chunk_size, dtype=np.int64)
    counts[-1] = s.nnz - s.chunk_size * (base.size - 1)
    q_end = np.append(qoff[1:], s.unary_bits)
    r_end = np.append(roff[1:], s.remainder_bits)
    # Ranges first, so that the differences below cannot overflow int64 on hostile values.
    in_range = [
        (bool(np.any(base < 0)) or bool(np.any(base >= numel)), "a chunk base lies outside the tensor"),
        (bool(np.any(qoff < 0)) or bool(np.any(qoff > s.unary_bits)), "a unary offset lies outside its stream"),
        (bool(np.any(roff < 0)) or bool(np.any(roff > s.remainder_bits)),
         "a remainder offset lies outside its stream"),
    ]
    for bad, message in in_range:
        if bad:
            raise CorruptPayloadError(f"{where}: chunk table invalid: {message}", path)
    problems = [
        (base[0] != 0 or qoff[0] != 0 or roff[0] != 0, "the first chunk does not start at zero"),
        (bool(np.any(np.diff(base) < 1)), "chunk bases are not strictly increasing"),
        (bool(np.any(np.diff(base) < counts[:-1])), "a chunk spans fewer positions than entries"),
        (bool(np.any(q_end - qoff < counts)), "a chunk has fewer unary bits than entries"),
        (bool(np.any(r_end - roff < counts * max(width - 1, 0))) or bool(np.any(r_end - roff > counts * width)),
         "a chunk's remainder bits do not fit its entries"),
        (numel - int(base[-1]) < int(counts[-1]), "the last chunk runs past the tensor end"),
    ]
    for bad, message in problems:
        if bad:
            raise CorruptPayloadError(f"{where}: chunk table invalid: {message}", path)


def decode(s: GolombStreams, numel: int, mode: int, out: np.ndarray, *, positive: int = 0, negative: int = 0,
           delta: float = 0.0, where: str, path: object) -> None:
    """Run the decode kernel over a validated payload (see ``kernels.MODE_*``)."""
    if s.nnz == 0:
        if mode == kernels.MODE_DENSE:
            out[:] = 0
        return
    if mode != kernels.MODE_CHECK and (out.ndim != 1 or out.size != numel):
        raise ValueError("output must be flat with numel entries")
    if mode == kernels.MODE_CHECK:
        out = np.empty(0, dtype=np.uint16)
    status = np.zeros(s.table.shape[0], dtype=np.int64)
    pattern = out.dtype.type
    kernels.decode_golomb(s.table, s.unary, s.remainders, s.signs, s.nnz, numel, s.golomb_m, s.chunk_size,
                          s.unary_bits, s.remainder_bits, mode, out, pattern(positive), pattern(negative),
                          np.float32(delta), kernels.F16_TO_F32, status)
    bad = np.flatnonzero(status)
    if bad.size:
        code = int(status[bad[0]])
        raise CorruptPayloadError(
            f"{where}: chunk {int(bad[0])} is corrupt: {kernels.STATUS_MESSAGES.get(code, code)}", path)
