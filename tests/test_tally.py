"""The check pass by tallies (compeft.codec.tally, kernels.tally_chunk) against the walk it replaces.

``tally_chunk`` must accept a chunk exactly when ``check_chunk`` (the full walk) does: on valid
payloads of every Golomb parameter shape (m = 1, m = 2 with no low field, powers of two, others),
and on payloads damaged at random — bit flips in any stream, chunk-table rows moved, header counts
changed — including chunks that pass the table checks. The check driver must still report the
walk's exact code for every rejected chunk.
"""

from __future__ import annotations

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from compeft.codec import golomb, kernels
from compeft.codec.arrays import address_table
from compeft.codec.tally import low_sums, ones_between


def packed(seed: int, numel: int, density: float, chunk_size: int, m: int | None = None):
    """Words, params and work of one random tensor (optionally forced to Golomb parameter ``m``)."""
    rng = np.random.default_rng(seed)
    values = (rng.standard_normal(numel) * (rng.random(numel) < density)).astype(np.float32)
    streams = golomb.encode(values, 0.0, chunk_size)
    if m is not None and streams.nnz:  # re-encode with a forced parameter: every code shape is reachable
        words_needed = golomb.stream_words
        from compeft.codec import encode_kernels
        thr = np.float32(0.0)
        _, _, costs = golomb.gap_costs(values, thr, np.array([m], dtype=np.int64))
        sizes = words_needed(streams.nnz, chunk_size, m, int(costs[0, 0]), int(costs[0, 1]))
        table = np.zeros((sizes[0] // 3, 3), dtype=np.int64)
        unary, low, high, signs = (np.zeros(n, dtype=np.uint64) for n in sizes[1:])
        encode_kernels.encode_golomb(values, thr, m, chunk_size, table, unary, low, high, signs)
        streams = golomb.GolombStreams(streams.nnz, m, chunk_size, int(costs[0, 0]), int(costs[0, 1]), table, unary,
                                       low, high, signs)
    words, params = golomb.pack([(streams, numel)])
    work = golomb.chunk_work((params[:, kernels.P_UNARY] - params[:, kernels.P_TABLE]) // 3)
    return words, params, work


def verdicts(words: np.ndarray, params: np.ndarray, work: np.ndarray) -> tuple[list[int], list[int]]:
    tally = [int(kernels.tally_chunk(words, params[t], c)) for t, c in work]
    walk = [int(kernels.check_chunk(words, params[t], c)) for t, c in work]
    return tally, walk


def assert_same_verdicts(words: np.ndarray, params: np.ndarray, work: np.ndarray) -> list[int]:
    tally, walk = verdicts(words, params, work)
    assert [v == kernels.OK for v in tally] == [v == kernels.OK for v in walk], (tally, walk)
    return walk


def driver_codes(words: np.ndarray, params: np.ndarray, work: np.ndarray) -> list[int]:
    empty = np.empty(0, dtype=np.uint16)
    table = address_table([empty] * params.shape[0], np.dtype(np.uint16), "output")
    aux = address_table([np.empty(0, np.float32)] * params.shape[0], np.dtype(np.float32), "aux")
    status = np.full(work.shape[0], -1, dtype=np.int64)  # every entry must be written
    kernels.check_chunks(words, params, table, empty, aux, np.zeros(params.shape[0], np.float32), work,
                         kernels.F16_TO_F32, status)
    return status.tolist()


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**32 - 1), numel=st.integers(1, 3000), density=st.floats(0.001, 1.0),
       chunk_size=st.sampled_from([1, 2, 3, 7, 64, 100, 16384]), m=st.sampled_from([None, 1, 2, 3, 4, 7, 8, 64, 1000]))
def test_valid_payloads_pass_both(seed, numel, density, chunk_size, m):
    words, params, work = packed(seed, numel, density, chunk_size, m)
    assert all(v == kernels.OK for v in assert_same_verdicts(words, params, work))
    assert driver_codes(words, params, work) == [kernels.OK] * work.shape[0]


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**32 - 1), numel=st.integers(2, 2000), density=st.floats(0.01, 0.9),
       chunk_size=st.sampled_from([1, 2, 5, 16, 64, 16384]), m=st.sampled_from([None, 1, 2, 3, 4, 6, 8, 33]),
       damage=st.lists(st.tuples(st.sampled_from(["flip", "table", "unary_bits", "high_bits"]), st.integers(0, 2**62)),
                       min_size=1, max_size=4))
def test_damaged_payloads_get_the_same_verdict(seed, numel, density, chunk_size, m, damage):
    words, params, work = packed(seed, numel, density, chunk_size, m)
    if not work.shape[0]:
        return
    row = params[0]
    for kind, x in damage:
        if kind == "flip":  # one bit of the table or of any stream
            word = x % words.size
            words[word] ^= np.uint64(1) << np.uint64((x >> 20) % 64)
        elif kind == "table":  # a table cell moved by a small amount
            cells = row[kernels.P_UNARY] - row[kernels.P_TABLE]
            cell = row[kernels.P_TABLE] + x % cells
            words[cell] = np.uint64((int(words[cell]) + (x >> 20) % 7 - 3) % 2**64)
        else:
            col = kernels.P_UNARY_BITS if kind == "unary_bits" else kernels.P_HIGH_BITS
            params[0, col] = max(0, int(params[0, col]) + (x % 9) - 4)
    walk = assert_same_verdicts(words, params, work)
    assert driver_codes(words, params, work) == walk  # the exact codes, whoever found the damage


def test_bit_tallies_against_python():
    rng = np.random.default_rng(5)
    words = rng.integers(0, 2**63, 9, dtype=np.int64).astype(np.uint64) * np.uint64(2) + np.uint64(1)
    bits = "".join(format(int(w), "064b")[::-1] for w in words)
    for start in range(0, 576, 7):
        for stop in range(start, 577, 11):
            assert ones_between(words, start, stop) == bits[start:stop].count("1")
    for width in (1, 2, 3, 5, 13, 31, 40):  # (the widest low field: b − 1 for MAX_GOLOMB_M)
        count = (576 - 64) // width
        xs = [int(bits[i * width:(i + 1) * width][::-1], 2) for i in range(count)]
        cut = 1 << (width - 1)
        assert low_sums(words, 0, count, width, cut) == (sum(xs), sum(x >= cut for x in xs))


def test_sums_that_could_overflow_are_left_to_the_walk():
    """m = 2^48 (47-bit low fields): 2^13 entries could sum past int64; the tally declines, the
    driver walks, and a valid chunk still passes."""
    numel = 1 << 50
    nnz = 1 << 14
    positions = np.arange(nnz, dtype=np.int64) * (1 << 36)
    m, width = 1 << 48, 47  # (a tensor too large to materialise: the streams are built by hand)
    low = np.zeros(-(-(nnz * width) // 64), dtype=np.uint64)
    for i, p in enumerate(positions):  # gap p - previous - 1 = q·m + r, q = 0; m a power of 2: every r long form
        r = int(p - (positions[i - 1] + 1 if i else 0))
        for k in range(width):
            if r >> k & 1:
                bit = i * width + k
                low[bit >> 6] |= np.uint64(1) << np.uint64(bit & 63)
    unary = np.zeros(-(-nnz // 64), dtype=np.uint64) + np.uint64(2**64 - 1)  # every quotient 0
    streams = golomb.GolombStreams(nnz, m, nnz, nnz, nnz, np.zeros((1, 3), np.int64), unary, low,  # high bits 0
                                   np.zeros(nnz // 64, np.uint64), np.zeros(nnz // 64, np.uint64))
    words, params = golomb.pack([(streams, numel)])
    work = golomb.chunk_work(np.array([1]))
    assert kernels.tally_chunk(words, params[0], 0) != kernels.OK
    assert kernels.check_chunk(words, params[0], 0) == kernels.OK
    assert driver_codes(words, params, work) == [kernels.OK]
