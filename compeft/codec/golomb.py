"""The ternary-golomb codec: encode kept entries of a flat float32 array, validate a payload, decode.

The public functions here validate every length and table entry in Python before a Numba kernel
touches a buffer (spec/FORMAT.md section 5 lists the invariants checked).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from ..errors import CorruptPayloadError, InvalidArgumentError
from ..format.header import ENCODING_GOLOMB, ENCODING_PACKED, MAX_GOLOMB_M, golomb_fields, golomb_payload_length
from . import encode_kernels, kernels, packed
from .floats import F16_TO_F32

DEFAULT_CHUNK_SIZE = 16384
# Writers pack a one-chunk tensor (spec/FORMAT.md 5.5) whose ternary-golomb payload is shorter than
# this: there the table row and the word padding of four streams (~38 bytes) are over 1 % of it.
# Larger ones keep the word layout, which decoders read in place.
PACK_BELOW = 4096


@dataclass(slots=True)
class GolombStreams:
    """The five parts of a ternary-golomb payload (spec/FORMAT.md 5.1), as numpy views."""

    nnz: int
    golomb_m: int
    chunk_size: int
    unary_bits: int
    high_bits: int
    table: np.ndarray  # int64[n_chunks, 3]: base position, unary bit offset, high bit offset
    unary: np.ndarray  # uint64[ceil(unary_bits / 64)]
    low: np.ndarray  # uint64[ceil(nnz * max(b - 1, 0) / 64)]: fixed-width low remainder fields
    high: np.ndarray  # uint64[ceil(high_bits / 64)]: one bit per long-form remainder
    signs: np.ndarray  # uint64[ceil(nnz / 64)]
    owner: Any = None  # the buffer the streams are views of, back to back, when parsed from one (:func:`pack`)
    address: int = 0  # ... and the address of their first byte

    def payload_parts(self) -> list[memoryview]:
        """The payload bytes in file order (little-endian words)."""
        return [memoryview(np.ascontiguousarray(a).astype("<u8", copy=False)).cast("B")
                for a in (self.table.reshape(-1), self.unary, self.low, self.high, self.signs)]

    def packed_payload(self) -> bytes:
        """The payload of a ``ternary-golomb-packed`` entry (spec/FORMAT.md 5.5): the four streams'
        bits back to back, no table (one chunk), zero bits up to the last byte."""
        if self.nnz > self.chunk_size:
            raise ValueError("only a one-chunk tensor can be packed")
        bits = [np.unpackbits(words.astype("<u8", copy=False).view(np.uint8), count=n, bitorder="little")
                for words, n in zip((self.unary, self.low, self.high, self.signs), self.stream_bits)]
        return np.packbits(np.concatenate(bits), bitorder="little").tobytes()

    @property
    def stream_bits(self) -> tuple[int, int, int, int]:
        """Bits of the unary, low, high and sign streams (without their padding)."""
        return self.unary_bits, self.nnz * golomb_fields(self.golomb_m).w, self.high_bits, self.nnz

    @property
    def payload_length(self) -> int:
        return golomb_payload_length(self.nnz, self.chunk_size, self.golomb_m, self.unary_bits, self.high_bits)


def stream_words(nnz: int, chunk_size: int, golomb_m: int, unary_bits: int, high_bits: int) -> tuple[int, ...]:
    """Words of the table, unary, low, high and sign parts."""
    width = golomb_fields(golomb_m).w
    return (3 * -(-nnz // chunk_size), -(-unary_bits // 64), -(-(nnz * width) // 64), -(-high_bits // 64),
            -(-nnz // 64))


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


SHORT_GAPS = 1 << 12  # gaps counted in a histogram (32 KB, in L1); longer ones are listed one by one
ENCODE_BLOCK = 1 << 18  # values per block of a parallel encode: a smaller tensor is one serial pass


def value_blocks(numel: int) -> np.ndarray:
    """Bounds (int64[B + 1]) of the blocks a tensor of ``numel`` values is encoded in."""
    count = max(1, numel // ENCODE_BLOCK)
    return np.array([numel * b // count for b in range(count + 1)], dtype=np.int64)


def count_blocks(values: np.ndarray, threshold: np.float32, bounds: np.ndarray
                 ) -> tuple[np.ndarray, list[np.ndarray], np.ndarray, np.ndarray]:
    """The counting pass over each block of ``values`` (in parallel when there are several): per
    block its gap histogram and long gaps, the gap before its first kept entry included, its kept
    entries, and the position after the last kept entry before it."""
    blocks = bounds.size - 1
    hists = np.zeros((blocks, SHORT_GAPS), dtype=np.int64)
    room = int((bounds[1:] - bounds[:-1]).max()) // (SHORT_GAPS + 1) + 1
    found = np.empty((blocks, room), dtype=np.int64)
    ends = np.zeros((blocks, 4), dtype=np.int64)  # kept, first kept index, last kept index, long gaps
    if blocks == 1:
        ends[0] = encode_kernels.count_gaps(values, 0, values.size, threshold, hists[0], found[0])
    else:
        encode_kernels.count_gaps_blocks(values, threshold, bounds, hists, found, ends)
    long_gaps, before = [], np.zeros(blocks, dtype=np.int64)
    nxt = 0
    for b in range(blocks):
        before[b] = nxt
        gaps = found[b, :ends[b, 3]]
        if ends[b, 0]:  # the gap before the block's first kept entry, from the blocks before it
            gap = int(ends[b, 1]) - nxt
            if gap < SHORT_GAPS:
                hists[b, gap] += 1
            else:
                gaps = np.append(gaps, gap)
            nxt = int(ends[b, 2]) + 1
        long_gaps.append(gaps)
    return hists, long_gaps, ends[:, 0].copy(), before


def gap_costs(values: np.ndarray, threshold: float, candidates: np.ndarray | None = None
              ) -> tuple[int, np.ndarray, np.ndarray]:
    """(nnz, the candidate Golomb parameters, their exact (unary bits, high bits) as int64[c, 2]) of
    the kept entries of ``values`` (float32, flat), in one pass over ``values``; ``candidates``
    default :func:`golomb_candidates`'s for the nnz found."""
    values = np.ascontiguousarray(values, dtype=np.float32).reshape(-1)
    hists, long_gaps, kept, _ = count_blocks(values, np.float32(threshold), value_blocks(values.size))
    return costs_of(hists, long_gaps, kept, values.size, candidates)


def costs_of(hists: np.ndarray, long_gaps: list[np.ndarray], kept: np.ndarray, numel: int,
             candidates: np.ndarray | None) -> tuple[int, np.ndarray, np.ndarray]:
    """:func:`gap_costs` from the blocks :func:`count_blocks` counted."""
    nnz = int(kept.sum())
    if candidates is None:
        candidates = golomb_candidates(nnz, numel)
    costs = np.zeros((candidates.size, 2), dtype=np.int64)
    if len(long_gaps) == 1:
        encode_kernels.gap_costs(hists[0], long_gaps[0], candidates, costs)
    else:
        encode_kernels.gap_costs(hists.sum(axis=0), np.concatenate(long_gaps), candidates, costs)
    return nnz, candidates, costs


def encode(values: np.ndarray, threshold: float, chunk_size: int = DEFAULT_CHUNK_SIZE) -> GolombStreams:
    """Encode the positions and signs of the kept entries of ``values`` (float32, flat): a counting
    pass (the exact size of every candidate parameter), then a writing pass with the cheapest;
    both in parallel over blocks of a large tensor (:data:`ENCODE_BLOCK`), with the same bytes."""
    values = np.ascontiguousarray(values, dtype=np.float32).reshape(-1)
    thr = np.float32(threshold)
    bounds = value_blocks(values.size)
    hists, long_gaps, kept, before = count_blocks(values, thr, bounds)
    nnz, candidates, costs = costs_of(hists, long_gaps, kept, values.size, None)
    widths = np.array([golomb_fields(int(m)).w for m in candidates], dtype=np.int64)
    best = int(np.argmin(costs.sum(axis=1) + nnz * widths))  # ties: the smallest m (candidates are sorted)
    m = int(candidates[best])
    unary_bits, high_bits = int(costs[best, 0]), int(costs[best, 1])
    sizes = stream_words(nnz, chunk_size, m, unary_bits, high_bits)
    table = np.zeros((sizes[0] // 3, 3), dtype=np.int64)
    unary, low, high, signs = (np.zeros(n, dtype=np.uint64) for n in sizes[1:])
    if bounds.size == 2:
        got = encode_kernels.encode_golomb(values, thr, m, chunk_size, table, unary, low, high, signs)
    else:
        got = encode_blocks(values, thr, m, chunk_size, bounds, hists, long_gaps, kept, before, table,
                            (unary, low, high, signs))
    assert got == (nnz, unary_bits, high_bits), "encoder passes disagree"
    return GolombStreams(nnz, m, chunk_size, unary_bits, high_bits, table, unary, low, high, signs)


def encode_blocks(values: np.ndarray, thr: np.float32, m: int, chunk_size: int, bounds: np.ndarray,
                  hists: np.ndarray, long_gaps: list[np.ndarray], kept: np.ndarray, before: np.ndarray,
                  table: np.ndarray, streams: tuple[np.ndarray, ...]) -> tuple[int, int, int]:
    """The writing pass in parallel over the blocks :func:`count_blocks` counted: each block starts
    from its place in the streams (from the counts of the blocks before it) and writes words of its
    own, ORed into ``streams`` (unary, low, high, signs) after. Returns (nnz, unary bits, high bits)."""
    blocks = bounds.size - 1
    width = golomb_fields(m).w
    per = np.zeros((blocks, 2), dtype=np.int64)  # each block's unary and high bits at m
    chosen = np.array([m], dtype=np.int64)
    for b in range(blocks):
        encode_kernels.gap_costs(hists[b], long_gaps[b], chosen, per[b:b + 1])
    entry = np.cumsum(kept) - kept
    unary, high = np.cumsum(per[:, 0]) - per[:, 0], np.cumsum(per[:, 1]) - per[:, 1]
    starts = np.stack([entry, before, unary, high], axis=1)
    begin = np.stack([unary, entry * width, high, entry], axis=1)  # each block's bits in each stream
    end = np.stack([unary + per[:, 0], (entry + kept) * width, high + per[:, 1], entry + kept], axis=1)
    first_word = begin >> 6
    words = np.where(end > begin, ((end - 1) >> 6) - first_word + 1, 0)
    offsets = np.cumsum(words, axis=0) - words
    own = tuple(np.zeros(int(words[:, s].sum()), dtype=np.uint64) for s in range(4))
    ends = np.zeros((blocks, 4), dtype=np.int64)
    encode_kernels.encode_blocks(values, thr, m, chunk_size, bounds, starts, table, own, offsets - first_word, ends)
    if not (np.array_equal(ends[:, 0], entry + kept) and np.array_equal(ends[:, 2:], end[:, [0, 2]])):
        raise AssertionError("encoder passes disagree")
    for s, stream in enumerate(streams):
        for b in np.flatnonzero(words[:, s]):
            at, n = int(first_word[b, s]), int(words[b, s])
            stream[at:at + n] |= own[s][offsets[b, s]:offsets[b, s] + n]
    return int(ends[-1, 0]), int(ends[-1, 2]), int(ends[-1, 3])


def parse_payload(payload: bytes | bytearray | memoryview | np.ndarray, *, nnz: int, numel: int, golomb_m: int,
                  chunk_size: int, unary_bits: int, high_bits: int, where: str, path: object,
                  check: bool = True, encoding: str = ENCODING_GOLOMB) -> GolombStreams:
    """Split a payload into its streams; with ``check``, also check the chunk table (spec 5.3).
    A packed payload (spec 5.5) is first expanded into the words of the equivalent one-chunk
    ternary-golomb payload, so every decoder reads one layout.

    (:func:`decode_many` checks every table again, in one batch, before it decodes.)
    """
    if nnz == 0 and (unary_bits or high_bits):
        raise CorruptPayloadError(f"{where}: a tensor with nnz 0 has empty streams", path)
    sizes = stream_words(nnz, chunk_size, golomb_m, unary_bits, high_bits)
    expected = (8 * sum(sizes) if encoding != ENCODING_PACKED else
                golomb_payload_length(nnz, chunk_size, golomb_m, unary_bits, high_bits, encoding))
    size = memoryview(payload).nbytes
    if size != expected:
        raise CorruptPayloadError(f"{where}: payload is {size} bytes, expected {expected}", path)
    if encoding == ENCODING_PACKED:
        if chunk_size < nnz:
            raise CorruptPayloadError(f"{where}: a packed tensor is one chunk", path)
        payload = unpack(payload, nnz, chunk_size, golomb_m, unary_bits, high_bits)
    words = np.frombuffer(payload, dtype="<u8") if not isinstance(payload, np.ndarray) else payload.view("<u8")
    t, u, low, h, n = sizes
    u += t
    low += u
    h += low
    table = words[:t].view(np.int64).reshape(t // 3, 3)
    streams = GolombStreams(nnz, golomb_m, chunk_size, unary_bits, high_bits, table, words[t:u], words[u:low],
                            words[low:h], words[h:h + n], payload.obj if isinstance(payload, memoryview) else None,
                            words.ctypes.data)
    if check:
        _check_table(streams, numel, where, path)
    return streams


def unpack(payload: bytes | bytearray | memoryview | np.ndarray, nnz: int, chunk_size: int, golomb_m: int,
           unary_bits: int, high_bits: int) -> np.ndarray:
    """The words of a one-chunk ternary-golomb payload holding the streams of a packed one (whose
    length the caller has checked): a table row of zeros, then each stream from its word boundary."""
    sizes = stream_words(nnz, chunk_size, golomb_m, unary_bits, high_bits)
    out = np.zeros(sum(sizes), dtype=np.uint64)
    bits = np.array((unary_bits, nnz * golomb_fields(golomb_m).w, high_bits, nnz), dtype=np.int64)
    starts = np.array(list(itertools.accumulate(sizes[:4])), dtype=np.int64)
    size = memoryview(payload).nbytes
    src = np.zeros(size // 8 + 2, dtype=np.uint64)  # whole words, one to spare: the kernel reads by word
    src.view(np.uint8)[:size] = np.frombuffer(payload, dtype=np.uint8)
    packed.unpack_streams(src, bits, out, starts)
    return out


def _check_table(s: GolombStreams, numel: int, where: str, path: object) -> None:
    code = kernels.check_table(s.table, s.nnz, numel, s.chunk_size, s.unary_bits, s.high_bits)
    if code != kernels.OK:
        raise CorruptPayloadError(f"{where}: {kernels.STATUS_MESSAGES[code]}", path)


@dataclass
class DecodeJob:
    """One tensor for :func:`decode_many`: its streams, flat output bits and what to write."""

    streams: GolombStreams
    numel: int
    out: np.ndarray  # flat uint16 / uint32 bits of the output (ignored by MODE_CHECK)
    where: str
    positive: int = 0  # value patterns of MODE_DENSE / MODE_SCATTER (bits of the output's dtype)
    negative: int = 0
    delta: float = 0.0  # the step (scale × magnitude) of MODE_ADD_* and MODE_TIES, as float32
    aux: np.ndarray | None = None  # float32[numel] sign-election sums (MODE_TIES only)
    drop_key: int = 0  # DARE (see kernels.P_DROP_*), MODE_ADD_F32 and MODE_TIES only: both in [0, 2**63)
    drop_cut: int = 0


_U16, _U32 = np.dtype(np.uint16), np.dtype(np.uint32)
# The output bits each mode writes: float32 bits (uint32) or 16-bit float bits (uint16).
OUTPUT_DTYPES = {kernels.MODE_DENSE: (_U16, _U32), kernels.MODE_SCATTER: (_U16, _U32),
                 kernels.MODE_ADD_F32: (_U32,), kernels.MODE_ADD_BF16: (_U16,), kernels.MODE_ADD_F16: (_U16,),
                 kernels.MODE_TIES: (_U32,)}
MODE_NAMES = {kernels.MODE_CHECK: "check", kernels.MODE_DENSE: "dense", kernels.MODE_SCATTER: "scatter",
              kernels.MODE_ADD_F32: "add_f32", kernels.MODE_ADD_BF16: "add_bf16", kernels.MODE_ADD_F16: "add_f16",
              kernels.MODE_TIES: "ties"}


def check_job(job: DecodeJob, mode: int, path: object = None) -> None:
    """Raise :class:`InvalidArgumentError` unless ``job`` fits decode mode ``mode``: its output's
    shape and dtype, its value patterns, aux array and DARE drops (see ``kernels.MODE_*``)."""
    name = MODE_NAMES[mode]
    if job.drop_cut and mode not in kernels.DARE_MODES:
        raise InvalidArgumentError(f"{job.where}: {name} drops no entries (DARE is for add_f32 and ties)", path)
    if not (0 <= job.drop_key < 1 << 63 and 0 <= job.drop_cut < 1 << 63):
        raise InvalidArgumentError(f"{job.where}: DARE key and cut must lie in [0, 2**63)", path)
    if mode == kernels.MODE_CHECK:
        return
    out = job.out
    size = 2 * job.numel if mode == kernels.MODE_TIES else job.numel
    if not isinstance(out, np.ndarray) or out.ndim != 1 or out.size != size:
        raise InvalidArgumentError(f"{job.where}: output must be flat with {size} entries", path)
    allowed = OUTPUT_DTYPES[mode]
    if out.dtype not in allowed:
        raise InvalidArgumentError(f"{job.where}: {name} writes {' or '.join(map(str, allowed))} bits, "
                                   f"not {out.dtype}", path)
    if not (out.flags.c_contiguous and out.flags.writeable):
        raise InvalidArgumentError(f"{job.where}: output must be contiguous and writeable", path)
    if mode in (kernels.MODE_DENSE, kernels.MODE_SCATTER):
        top = np.iinfo(out.dtype).max
        if not (0 <= job.positive <= top and 0 <= job.negative <= top):
            raise InvalidArgumentError(f"{job.where}: value patterns must be {out.dtype} bits", path)
    aux = job.aux
    if mode != kernels.MODE_TIES:
        if aux is not None:
            raise InvalidArgumentError(f"{job.where}: only ties reads an aux array", path)
    elif (not isinstance(aux, np.ndarray) or aux.dtype != np.float32 or aux.ndim != 1 or aux.size != job.numel
          or not aux.flags.c_contiguous):
        raise InvalidArgumentError(f"{job.where}: ties needs aux, a contiguous float32[{job.numel}]", path)


def decode_many(jobs: Sequence[DecodeJob], mode: int, path: object) -> None:
    """Check every job against ``mode`` (:func:`check_job`, before anything is written), check the
    chunk tables, then decode every chunk of every job in one parallel region per output dtype
    (see ``kernels.MODE_*``). Raises :class:`CorruptPayloadError` naming the first bad tensor."""
    if mode not in MODE_NAMES:
        raise InvalidArgumentError(f"unknown decode mode {mode!r}", path)
    for job in jobs:
        check_job(job, mode, path)
    groups: dict[Any, list[DecodeJob]] = {}
    for job in jobs:
        if job.streams.nnz == 0:
            if mode == kernels.MODE_DENSE:
                job.out[:] = 0
            continue
        key = _U16 if mode == kernels.MODE_CHECK else job.out.dtype
        groups.setdefault(key, []).append(job)
    for group in groups.values():
        _decode_group(group, mode, path)


def pack(tensors: Sequence[tuple[GolombStreams, int]], *, share: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """The words of every (streams, numel) in one array, and a parameter row per tensor
    (int64[t, N_PARAMS]: header fields and word offsets; value patterns and drops zero).

    With ``share``, when every tensor's streams are views of one buffer (the payloads of one read,
    :meth:`compeft.CompressedExpert.payloads`) at whole-word offsets, that buffer itself is the
    words array and nothing is copied (the kernels read only the streams the rows point at);
    otherwise the streams are concatenated."""
    params = np.zeros((len(tensors), kernels.N_PARAMS), dtype=np.int64)
    shared = _shared_words(tensors) if share else None
    parts: list[np.ndarray] = []
    offset = 0
    for t, (s, numel) in enumerate(tensors):
        if shared is not None:
            offset = (s.address - shared[1]) // 8
        row = [s.nnz, numel, s.golomb_m, s.chunk_size, s.unary_bits, s.high_bits, 0, 0, offset]
        for part in (s.table.reshape(-1).view(np.uint64), s.unary, s.low, s.high, s.signs):
            if shared is None:
                parts.append(part)
            offset += part.size
            row.append(offset)
        params[t, :len(row)] = row
    if shared is not None:
        return shared[0], params
    words = np.concatenate(parts) if parts else np.empty(0, np.uint64)
    return words, params


def _shared_words(tensors: Sequence[tuple[GolombStreams, int]]) -> tuple[np.ndarray, int] | None:
    """(the one buffer all streams are views of, as uint64 words; its address), or None."""
    owner = tensors[0][0].owner if tensors else None
    if owner is None or any(s.owner is not owner for s, _ in tensors):
        return None
    raw = np.frombuffer(owner, dtype=np.uint8)
    start = raw.__array_interface__["data"][0]
    words = raw[:raw.size // 8 * 8].view(np.uint64)
    for s, _ in tensors:  # each tensor's five streams (back to back) inside the buffer, at a word offset
        at = s.address - start
        if at < 0 or at % 8 or at + 8 * sum(stream_words(s.nnz, s.chunk_size, s.golomb_m, s.unary_bits,
                                                          s.high_bits)) > words.nbytes:
            return None
    return words, start


def chunk_work(chunks: np.ndarray) -> np.ndarray:
    """(tensor, chunk) pairs, int64[Σ chunks, 2], for tensors with ``chunks[t]`` chunks each."""
    work = np.empty((int(chunks.sum()), 2), dtype=np.int64)
    work[:, 0] = np.repeat(np.arange(chunks.size), chunks)
    work[:, 1] = np.arange(work.shape[0]) - np.repeat(np.cumsum(chunks) - chunks, chunks)
    return work


def _decode_group(group: list[DecodeJob], mode: int, path: object) -> None:
    words, params = pack([(job.streams, job.numel) for job in group], share=True)
    params[:, [kernels.P_POSITIVE, kernels.P_NEGATIVE, kernels.P_DROP_KEY, kernels.P_DROP_CUT]] = [
        (job.positive, job.negative, job.drop_key, job.drop_cut) for job in group]
    outs = None if mode == kernels.MODE_CHECK else [job.out for job in group]
    auxs = [job.aux for job in group] if mode == kernels.MODE_TIES else None
    status = np.zeros(len(group), dtype=np.int64)
    kernels.check_tables(words, params, status)
    _raise_first(status, None, group, path)
    work = chunk_work((params[:, kernels.P_UNARY] - params[:, kernels.P_TABLE]) // 3)
    deltas = np.array([job.delta for job in group], dtype=np.float32)
    status = np.zeros(work.shape[0], dtype=np.int64)
    kernels.decode_golomb(words, params, outs, auxs, deltas, work, mode, F16_TO_F32, status)
    _raise_first(status, work, group, path)


def _raise_first(status: np.ndarray, work: np.ndarray | None, group: list[DecodeJob], path: object) -> None:
    bad = np.flatnonzero(status)
    if not bad.size:
        return
    code = int(status[bad[0]])
    message = kernels.STATUS_MESSAGES.get(code, str(code))
    if work is None:
        raise CorruptPayloadError(f"{group[int(bad[0])].where}: {message}", path)
    t, c = work[bad[0]]
    raise CorruptPayloadError(f"{group[int(t)].where}: chunk {int(c)} is corrupt: {message}", path)


def decode(s: GolombStreams, numel: int, mode: int, out: np.ndarray, *, positive: int = 0, negative: int = 0,
           delta: float = 0.0, aux: np.ndarray | None = None, drop_key: int = 0, drop_cut: int = 0, where: str,
           path: object) -> None:
    """Decode one tensor (see :func:`decode_many`)."""
    decode_many([DecodeJob(s, numel, out, where, positive, negative, delta, aux, drop_key, drop_cut)], mode, path)
