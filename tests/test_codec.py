"""The ternary-golomb codec (compeft.codec.golomb and its Numba kernels) against the independent
bitarray reference (compeft.codec.reference), torch and numpy."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from numba import njit

from compeft.codec import encode_kernels, floats, golomb, kernels, reference
from compeft.errors import CorruptPayloadError

SETTINGS = settings(max_examples=80, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

FIXED_MS = [1, 2, 3, 5, 8, 13, 1000]  # (and 2**33 + 5 in the hypothesis test)
TORCH_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


# ---------------------------------------------------------------------------------------------
# helpers


def payload_bytes(s: golomb.GolombStreams) -> bytes:
    return b"".join(bytes(part) for part in s.payload_parts())


def header_of(s: golomb.GolombStreams) -> dict:
    return dict(nnz=s.nnz, golomb_m=s.golomb_m, chunk_size=s.chunk_size, unary_bits=s.unary_bits,
                high_bits=s.high_bits)


def low_width(m: int) -> int:
    """w = max(ceil(log2 m) - 1, 0), computed by counting."""
    b = 0
    while 2 ** b < m:
        b += 1
    return max(b - 1, 0)


def truth(values: np.ndarray, threshold: float) -> tuple[list[int], list[int]]:
    """Kept positions and sign bits computed with numpy (float32 comparisons)."""
    v = np.asarray(values, dtype=np.float32)
    with np.errstate(invalid="ignore"):
        keep = (v != 0) & (np.abs(v) >= np.float32(threshold))
    pos = np.flatnonzero(keep)
    return pos.tolist(), (v[pos] < 0).astype(int).tolist()


def encode_with_m(values: np.ndarray, threshold: float, m: int, chunk_size: int) -> golomb.GolombStreams:
    """The Numba encoder with a forced Golomb parameter (golomb.encode picks its own)."""
    values = np.ascontiguousarray(values, dtype=np.float32)
    thr = np.float32(threshold)
    nnz, _, costs = golomb.gap_costs(values, thr, np.array([m], dtype=np.int64))
    unary_bits, high_bits = int(costs[0, 0]), int(costs[0, 1])
    sizes = golomb.stream_words(nnz, chunk_size, m, unary_bits, high_bits)
    assert sizes == (3 * -(-nnz // chunk_size), -(-unary_bits // 64), -(-(nnz * low_width(m)) // 64),
                     -(-high_bits // 64), -(-nnz // 64))
    table = np.zeros((sizes[0] // 3, 3), dtype=np.int64)
    unary, low, high, signs = (np.zeros(n, dtype=np.uint64) for n in sizes[1:])
    got = encode_kernels.encode_golomb(values, thr, m, chunk_size, table, unary, low, high, signs)
    assert tuple(int(x) for x in got) == (nnz, unary_bits, high_bits)
    return golomb.GolombStreams(nnz, m, chunk_size, unary_bits, high_bits, table, unary, low, high, signs)


def parse(payload, numel: int, hdr: dict, check: bool = True) -> golomb.GolombStreams:
    return golomb.parse_payload(payload, numel=numel, where="test", path=None, check=check, **hdr)


def numba_dense(payload, numel: int, hdr: dict, dtype: np.dtype, positive: int, negative: int,
                fill: int, mode: int = kernels.MODE_DENSE, start: int | None = None) -> np.ndarray:
    """MODE_DENSE (or ``mode``) into an output that sits between two guard regions filled with
    ``fill``; the output itself starts as ``fill`` too (garbage) unless ``start`` is given."""
    guard = 64
    big = np.full(numel + 2 * guard, fill, dtype=dtype)
    out = big[guard:guard + numel]
    if start is not None:
        out[:] = start
    golomb.decode(parse(payload, numel, hdr), numel, mode, out, positive=positive,
                  negative=negative, where="test", path=None)
    assert (big[:guard] == fill).all() and (big[guard + numel:] == fill).all(), "wrote out of bounds"
    return out.copy()


def f16_bits(x: float) -> int:
    return int(torch.tensor(float(x), dtype=torch.float32).to(torch.float16).view(torch.int16).item()) & 0xFFFF


def bf16_bits(x: float) -> int:
    return int(torch.tensor(float(x), dtype=torch.float32).to(torch.bfloat16).view(torch.int16).item()) & 0xFFFF


def f32_bits(x: float) -> int:
    return int(np.array([x], dtype=np.float32).view(np.uint32)[0])


def check_streams_by_arithmetic(payload: bytes, numel: int, hdr: dict, expected) -> None:
    """A third, bitarray-free reading of the layout: each stream as one Python integer, every
    field checked against the gaps of the expected positions (normative layout, spec 5.1/5.2)."""
    positions, signs = expected
    nnz, m, chunk, ub, hb = (hdr[k] for k in ("nnz", "golomb_m", "chunk_size", "unary_bits", "high_bits"))
    w = low_width(m)
    b = 0 if m == 1 else w + 1
    cut = 2 ** b - m
    half = 2 ** (b - 1) - cut if b else 0
    n_chunks = -(-nnz // chunk)
    sizes = [3 * n_chunks, -(-ub // 64), -(-(nnz * w) // 64), -(-hb // 64), -(-nnz // 64)]
    assert len(payload) == 8 * sum(sizes)
    bounds = np.cumsum([0] + sizes) * 8
    table = np.frombuffer(payload[:bounds[1]], "<u8").reshape(n_chunks, 3).tolist()
    unary, low, high, sign = (int.from_bytes(payload[bounds[i]:bounds[i + 1]], "little") for i in range(1, 5))
    assert unary >> ub == 0 and low >> (nnz * w) == 0 and high >> hb == 0 and sign >> nnz == 0  # zero padding
    qpos = hpos = 0
    previous = -1
    for i, p in enumerate(positions):
        if i % chunk == 0:
            assert table[i // chunk] == [previous + 1, qpos, hpos]
        g = p - previous - 1
        previous = p
        q, r = divmod(g, m)
        assert (unary >> qpos) & ((1 << (q + 1)) - 1) == 1 << q  # q zeros, then a one
        qpos += q + 1
        x = (low >> (i * w)) & ((1 << w) - 1)
        if b and r >= cut:
            assert x == cut + (r - cut) % half and (high >> hpos) & 1 == (r - cut) // half
            hpos += 1
        else:
            assert x == r
        assert (sign >> i) & 1 == signs[i]
    assert (qpos, hpos) == (ub, hb)


# ---------------------------------------------------------------------------------------------
# input strategies


def _nextafter(x, toward) -> np.float32:
    return np.nextafter(np.float32(x), np.float32(toward))


@st.composite
def inputs(draw, max_len: int = 5000) -> tuple[np.ndarray, float]:
    """(float32 values, threshold) covering dense and sparse data, ties at the threshold, ±0,
    all-equal magnitudes, non-finite values and long empty runs."""
    size = draw(st.sampled_from(["small", "medium", "large"]))
    n = draw(st.integers(0, 70) if size == "small" else st.integers(70, 1500) if size == "medium"
             else st.integers(1500, max_len))
    kind = draw(st.sampled_from(["gauss", "sparse", "ties", "equal", "special", "clustered"]))
    density = draw(st.sampled_from([0.0, 0.0005, 0.01, 0.1, 0.5, 0.9, 1.0]))
    rng = np.random.default_rng(draw(st.integers(0, 2 ** 32 - 1)))
    if kind == "gauss":
        v = rng.standard_normal(n).astype(np.float32)
        if n == 0 or density == 0.0:
            thr = np.inf
        else:  # a data value: the entries equal to it are ties, and kept
            thr = np.quantile(np.abs(v), 1 - density, method="inverted_cdf")
    elif kind == "sparse":
        v = np.where(rng.random(n) < 0.5, np.float32(0.0), np.float32(-0.0)).astype(np.float32)
        mask = rng.random(n) < density
        v[mask] = rng.standard_normal(int(mask.sum())).astype(np.float32)
        thr = 0.0
    elif kind == "ties":
        t = np.float32(draw(st.sampled_from([1e-3, 0.5, 1.0, 3.0e38, 1e-40])))  # 1e-40: subnormal
        pool = np.array([0.0, -0.0, t, -t, _nextafter(t, 0), -_nextafter(t, 0), _nextafter(t, np.inf),
                         -_nextafter(t, np.inf)], dtype=np.float32)
        v = pool[rng.integers(0, pool.size, n)]
        thr = t
    elif kind == "equal":
        c = np.float32(draw(st.sampled_from([1e-3, 1.0, 7.5])))
        v = np.where(rng.random(n) < density, c * rng.choice(np.array([-1, 1], np.float32), n), 0)
        thr = draw(st.sampled_from([0.0, float(c) / 2, float(c)]))
    elif kind == "special":
        pool = np.array([0.0, -0.0, np.inf, -np.inf, np.nan, 1e-45, -1e-45, 1.1754944e-38,
                         np.finfo(np.float32).max, -np.finfo(np.float32).max, 1.0, -1.0], dtype=np.float32)
        v = pool[rng.integers(0, pool.size, n)]
        thr = draw(st.sampled_from([0.0, 1e-45, 1.0, np.inf]))
    else:  # clustered: a few isolated entries (huge quotients) and maybe a dense burst
        v = np.zeros(n, dtype=np.float32)
        if n:
            k = min(n, draw(st.integers(0, 6)))
            v[rng.choice(n, size=k, replace=False)] = rng.choice(np.array([-2, 2], np.float32), k)
            if draw(st.booleans()):
                start = int(rng.integers(0, n))
                v[start:start + 100] = rng.choice(np.array([-1, 1], np.float32), len(v[start:start + 100]))
            if draw(st.booleans()):
                v[-1] = 3.0  # the very last element kept
        thr = 1.0
    return np.ascontiguousarray(v, dtype=np.float32), float(np.float32(thr))


chunk_sizes = st.integers(1, 300)


# ---------------------------------------------------------------------------------------------
# the reference itself (sanity checks of the oracle)


def test_reference_rounding_matches_torch():
    rng = np.random.default_rng(7)
    x = rng.integers(0, 2 ** 32, 20000, dtype=np.uint64).astype(np.uint32).view(np.float32)
    x = np.concatenate([x[np.isfinite(x)], np.float32([65504, 65519.996, 65520, 65536, 1e-8, 2.0 ** -25,
                                                       3 * 2.0 ** -25, -2.0 ** -26, 0.0, -0.0])])
    t = torch.from_numpy(x)
    for dtype, tdtype in TORCH_DTYPES.items():
        expected = t.to(tdtype).float().numpy().view(np.uint32)
        got = np.array([reference.round_to_dtype(float(v), dtype) for v in x], dtype=np.float32).view(np.uint32)
        assert (got == expected).all(), dtype


def _hand_case(positions, signs, numel, m, chunk_size, expected_words, expected_counts):
    v = np.zeros(numel, np.float32)
    v[positions] = [-1.0 if s else 1.0 for s in signs]
    payload, nnz, ub, hb = reference.encode_payload(v, 0.5, m, chunk_size)
    assert (nnz, ub, hb) == expected_counts
    assert np.frombuffer(payload, "<u8").tolist() == expected_words
    assert len(payload) == 8 * sum(golomb.stream_words(nnz, chunk_size, m, ub, hb))
    assert reference.decode_positions_signs(payload, nnz=nnz, numel=numel, golomb_m=m, chunk_size=chunk_size,
                                            unary_bits=ub, high_bits=hb) == (positions, signs)
    # and the Numba codec agrees
    s = encode_with_m(v, 0.5, m, chunk_size)
    assert payload_bytes(s) == payload
    dense = numba_dense(payload, numel, header_of(s), np.uint32, 1, 2, 0xFFFFFFFF)
    assert np.flatnonzero(dense).tolist() == positions and (dense[positions] == [1 + s for s in signs]).all()


def test_reference_layout_by_hand_m3():
    # positions 0, 4, 5, 13, m = 3 (b 2, cut 1, half 1, w 1), chunk_size 2:
    # gaps 0, 3, 0, 7 -> q 0, 1, 0, 2; r 0, 0, 0, 1 -> short, short, short, long (j 0: low 1, high 0)
    _hand_case([0, 4, 5, 13], [0, 1, 0, 1], 16, 3, 2, [
        0, 0, 0, 5, 3, 0,  # table: chunk 1 starts after position 4, unary bit 3, high bit 0
        0b1001101,  # unary, bit 0 first: 1 | 0 1 | 1 | 0 0 1
        0b1000,  # low fields (1 bit each): 0 | 0 | 0 | 1
        0,  # high: one long-form entry, bit 0
        0b1010,  # signs
    ], (4, 7, 1))


def test_reference_layout_by_hand_m5():
    # positions 4, 8, 10, 20, 21 of 24, m = 5 (b 3, cut 3, half 1, w 2), chunk_size 2:
    # gaps 4, 3, 1, 9, 0 -> q 0, 0, 0, 1, 0; r 4, 3, 1, 4, 0
    # r 4: long, j 1 -> low 3, high 1; r 3: long, j 0 -> low 3, high 0; r 1, r 0: short
    _hand_case([4, 8, 10, 20, 21], [0, 1, 1, 0, 1], 24, 5, 2, [
        0, 0, 0, 9, 2, 2, 21, 5, 3,  # the last chunk has no long-form entry: its high offset = high_bits
        0b110111,  # unary: 1 | 1 | 1 | 0 1 | 1
        3 | 3 << 2 | 1 << 4 | 3 << 6 | 0 << 8,  # low fields, 2 bits each at bit 2 * i
        0b101,  # high bits of entries 0, 1, 3
        0b10110,
    ], (5, 6, 3))


def test_reference_layout_by_hand_m2():
    # m = 2: w = 0 (no low stream), cut = 0: every entry is long-form, its high bit = r
    # gaps 0, 3, 0, 7 -> q 0, 1, 0, 3; r 0, 1, 0, 1
    _hand_case([0, 4, 5, 13], [0, 1, 0, 1], 16, 2, 2, [
        0, 0, 0, 5, 3, 2,
        0b10001101,  # 1 | 0 1 | 1 | 0 0 0 1
        0b1010,  # high
        0b1010,  # signs
    ], (4, 8, 4))


def test_reference_layout_by_hand_m1():
    # m = 1: unary only, q = gap
    _hand_case([0, 4, 5, 13], [1, 1, 0, 0], 16, 1, 3, [
        0, 0, 0, 6, 6, 0,  # chunk 1 = entry 3: after position 5, unary bit 6
        0b10000000110001,  # 1 | 0 0 0 1 | 1 | 0 0 0 0 0 0 0 1
        0b0011,
    ], (4, 14, 0))


def test_reference_low_field_crosses_words():
    # m = 13 (b 4, cut 3, half 5, w 3): entry 21's low field is bits 63..65
    m, n_kept = 13, 40
    gaps = [(7 * i) % 26 for i in range(n_kept)]
    positions = list(np.cumsum(np.array(gaps) + 1) - 1)
    v = np.zeros(positions[-1] + 5, np.float32)
    v[positions] = 1.0
    payload, nnz, ub, hb = reference.encode_payload(v, 0.5, m, 7)
    words = golomb.stream_words(nnz, 7, m, ub, hb)
    low = int.from_bytes(payload[8 * sum(words[:2]):8 * sum(words[:3])], "little")
    high = int.from_bytes(payload[8 * sum(words[:3]):8 * sum(words[:4])], "little")
    h = 0
    for i, g in enumerate(gaps):
        r = g % m
        x = (low >> (3 * i)) & 7
        if r < 3:
            assert x == r
        else:
            assert x == 3 + (r - 3) % 5 and (high >> h) & 1 == (r - 3) // 5
            h += 1
    assert h == hb
    assert payload_bytes(encode_with_m(v, 0.5, m, 7)) == payload


# ---------------------------------------------------------------------------------------------
# encoder: Numba vs reference


@SETTINGS
@given(inputs(), chunk_sizes, st.sampled_from(FIXED_MS + [2 ** 33 + 5]))
@example((np.zeros(0, np.float32), 1.0), 1, 1)
@example((np.float32([0.0, -0.0, 1.0]), 1.0), 1, 3)
def test_encode_matches_reference(case, chunk_size, m):
    values, thr = case
    s = golomb.encode(values, thr, chunk_size)
    payload = payload_bytes(s)
    assert reference.encode_payload(values, thr, s.golomb_m, chunk_size) == (
        payload, s.nnz, s.unary_bits, s.high_bits)
    assert len(payload) == s.payload_length == 8 * sum(
        golomb.stream_words(s.nnz, chunk_size, s.golomb_m, s.unary_bits, s.high_bits))
    expected = truth(values, thr)
    assert reference.decode_positions_signs(payload, numel=values.size, **header_of(s)) == expected
    check_streams_by_arithmetic(payload, values.size, header_of(s), expected)

    forced = encode_with_m(values, thr, m, chunk_size)
    assert reference.encode_payload(values, thr, m, chunk_size) == (
        payload_bytes(forced), forced.nnz, forced.unary_bits, forced.high_bits)
    assert len(payload_bytes(forced)) == forced.payload_length
    assert reference.decode_positions_signs(payload_bytes(forced), numel=values.size,
                                            **header_of(forced)) == expected
    check_streams_by_arithmetic(payload_bytes(forced), values.size, header_of(forced), expected)


# ---------------------------------------------------------------------------------------------
# decoder: Numba vs reference (MODE_DENSE) and vs torch (MODE_ADD_*)

SCALES = [0.0, 1e-3, 0.1234567, 1.0, 2.0 ** -20, 65519.0, 65520.0, 1e5, 3.0e38]


@SETTINGS
@given(inputs(), chunk_sizes, st.sampled_from(SCALES))
def test_decode_dense_matches_reference(case, chunk_size, scale):
    values, thr = case
    numel = values.size
    s = golomb.encode(values, thr, chunk_size)
    payload, hdr = payload_bytes(s), header_of(s)
    assert golomb.decode(parse(payload, numel, hdr), numel, kernels.MODE_CHECK, np.empty(0, np.uint16),
                         where="test", path=None) is None
    positions, signs = truth(values, thr)

    ref32 = reference.decode_dense(payload, numel=numel, scale=scale, dtype="F32", **hdr)
    assert np.flatnonzero(ref32).tolist() == (positions if scale else [])
    patterns = (f32_bits(scale), f32_bits(-np.float32(scale)))
    got = numba_dense(payload, numel, hdr, np.uint32, *patterns, 0xDEADBEEF)
    assert (got == ref32.view(np.uint32)).all()
    # MODE_SCATTER: no zero-fill pass; into zeros it gives the dense result, into garbage it
    # writes the kept entries only
    scattered = numba_dense(payload, numel, hdr, np.uint32, *patterns, 0xDEADBEEF, kernels.MODE_SCATTER, 0)
    assert (scattered == ref32.view(np.uint32)).all()
    onto = numba_dense(payload, numel, hdr, np.uint32, *patterns, 0xDEADBEEF, kernels.MODE_SCATTER)
    kept = np.zeros(numel, bool)
    kept[positions] = True
    assert (onto[kept] == ref32.view(np.uint32)[kept]).all() and (onto[~kept] == 0xDEADBEEF).all()

    for dtype, to_bits in (("F16", f16_bits), ("BF16", bf16_bits)):
        ref = reference.decode_dense(payload, numel=numel, scale=scale, dtype=dtype, **hdr)
        value = float(torch.tensor(scale).to(TORCH_DTYPES[dtype]).float())
        assert (np.abs(ref[positions]) == np.float32(value)).all()
        got16 = numba_dense(payload, numel, hdr, np.uint16, to_bits(scale), to_bits(-scale), 0xBEEF)
        widened = torch.from_numpy(got16.view(np.int16)).view(TORCH_DTYPES[dtype]).float().numpy()
        assert (widened.view(np.uint32) == ref.view(np.uint32)).all(), dtype
        scattered16 = numba_dense(payload, numel, hdr, np.uint16, to_bits(scale), to_bits(-scale), 0xBEEF,
                                  kernels.MODE_SCATTER, 0)
        assert (scattered16 == got16).all(), dtype
        neg = [p for p, sg in zip(positions, signs) if sg]
        assert (got16[neg] == to_bits(-scale)).all()


def base_weights(rng: np.random.Generator, n: int, dtype: str) -> torch.Tensor:
    """Random weights of ``dtype``: typical values, random bit patterns (subnormals, huge values),
    values near the float16 maximum, zeros of both signs, infinities and NaNs."""
    typical = torch.from_numpy(rng.standard_normal(n).astype(np.float32) * 0.05).to(TORCH_DTYPES[dtype])
    if dtype == "F32":
        raw = torch.from_numpy(rng.integers(0, 2 ** 32, n, dtype=np.uint64).astype(np.uint32).view(np.int32))
        raw = raw.view(torch.float32)
        specials = torch.tensor([0.0, -0.0, math.inf, -math.inf, math.nan, 1e-45, -1e-45, 1e-40, 65504.0,
                                 -65504.0, 3.4028235e38, -3.4028235e38, 1.0, -1.0], dtype=torch.float32)
    else:
        raw = torch.from_numpy(rng.integers(0, 2 ** 16, n, dtype=np.uint64).astype(np.uint16).view(np.int16))
        raw = raw.view(TORCH_DTYPES[dtype])
        specials = torch.tensor([0.0, -0.0, math.inf, -math.inf, math.nan, 6e-8, -6e-8, 1e-5, 65504.0, -65504.0,
                                 65472.0, -65472.0, 65500.0, 3.0e38, 1.0, -1.0]).to(TORCH_DTYPES[dtype])
    choice = rng.integers(0, 3, n)
    special_pick = specials[torch.from_numpy(rng.integers(0, specials.numel(), n))]
    return torch.where(torch.from_numpy(choice == 0), typical,
                       torch.where(torch.from_numpy(choice == 1), raw, special_pick)).contiguous()


DELTAS = [0.0, 1e-45, 6e-8, 1e-3, 0.0123, 1.0, 16.0, 32.0, 60000.0, 3.0e38]
ADD_MODES = {"F32": kernels.MODE_ADD_F32, "BF16": kernels.MODE_ADD_BF16, "F16": kernels.MODE_ADD_F16}


@SETTINGS
@given(st.integers(0, 2 ** 32 - 1), st.integers(0, 5000), chunk_sizes, st.sampled_from(sorted(ADD_MODES)),
       st.sampled_from(DELTAS), st.sampled_from([0.01, 0.3, 1.0]))
def test_decode_add_matches_torch(seed, n, chunk_size, dtype, delta, density):
    rng = np.random.default_rng(seed)
    values = np.where(rng.random(n) < density, rng.standard_normal(n), 0).astype(np.float32)
    s = golomb.encode(values, 0.0, chunk_size)
    streams = parse(payload_bytes(s), n, header_of(s))
    positions, signs = truth(values, 0.0)

    tdtype = TORCH_DTYPES[dtype]
    w = base_weights(rng, n, dtype)
    d = torch.from_numpy(np.where(np.array(signs, dtype=bool), -np.float32(delta), np.float32(delta))
                         .astype(np.float32))
    idx = torch.tensor(positions, dtype=torch.long)
    expected = w.clone()
    expected[idx] = (w[idx].float() + d).to(tdtype)

    int_type = torch.int32 if dtype == "F32" else torch.int16
    out = w.view(int_type).numpy().view(np.uint32 if dtype == "F32" else np.uint16).copy()
    golomb.decode(streams, n, ADD_MODES[dtype], out, delta=delta, where="test", path=None)
    got = torch.from_numpy(out.view(np.int32 if dtype == "F32" else np.int16)).view(tdtype)

    nan = torch.isnan(expected)
    assert torch.equal(torch.isnan(got), nan)  # NaN stays NaN, nothing else becomes NaN
    assert torch.equal(got[~nan].view(int_type), expected[~nan].view(int_type))


# ---------------------------------------------------------------------------------------------
# float conversion helpers of the kernels, exhaustively / on millions of patterns


@njit(cache=True)
def _to_f16(a, out):
    for i in range(a.shape[0]):
        out[i] = floats.f32_to_f16_bits(a[i])


@njit(cache=True)
def _to_bf16(a, out):
    for i in range(a.shape[0]):
        out[i] = floats.f32_to_bf16_bits(a[i])


@njit(cache=True)
def _from_bf16(h, out):
    for i in range(h.shape[0]):
        out[i] = floats.bf16_bits_to_f32(h[i])


def to_f16(a: np.ndarray) -> np.ndarray:
    out = np.empty(a.size, np.uint16)
    _to_f16(np.ascontiguousarray(a, dtype=np.float32), out)
    return out


def to_bf16(a: np.ndarray) -> np.ndarray:
    out = np.empty(a.size, np.uint16)
    _to_bf16(np.ascontiguousarray(a, dtype=np.float32), out)
    return out


ALL16 = np.arange(65536, dtype=np.uint32).astype(np.uint16)


def is_nan16(bits: np.ndarray, exp_mask: int, man_mask: int) -> np.ndarray:
    return ((bits & exp_mask) == exp_mask) & ((bits & man_mask) != 0)


def test_f16_all_patterns_round_trip():
    f32 = floats.F16_TO_F32
    assert (f32.view(np.uint32) == ALL16.view(np.float16).astype(np.float32).view(np.uint32)).all()
    torch_f32 = torch.from_numpy(ALL16.view(np.int16)).view(torch.float16).float().numpy()
    nan = np.isnan(torch_f32)
    assert (np.isnan(f32) == nan).all() and (f32.view(np.uint32)[~nan] == torch_f32.view(np.uint32)[~nan]).all()
    back = to_f16(f32)
    src_nan = is_nan16(ALL16, 0x7C00, 0x03FF)
    assert src_nan.sum() == 2 * 1023
    assert (back[~src_nan] == ALL16[~src_nan]).all()
    assert is_nan16(back[src_nan], 0x7C00, 0x03FF).all()  # a NaN stays a NaN ...
    assert ((back[src_nan] & 0x8000) == (ALL16[src_nan] & 0x8000)).all()  # ... of the same sign


def test_bf16_all_patterns_round_trip():
    out = np.empty(65536, np.float32)
    _from_bf16(ALL16, out)
    expected = torch.from_numpy(ALL16.view(np.int16)).view(torch.bfloat16).float().numpy()
    assert (out.view(np.uint32) == expected.view(np.uint32)).all()
    assert (out.view(np.uint32) == ALL16.astype(np.uint32) << 16).all()
    back = to_bf16(out)
    src_nan = is_nan16(ALL16, 0x7F80, 0x007F)
    assert (back[~src_nan] == ALL16[~src_nan]).all()
    assert is_nan16(back[src_nan], 0x7F80, 0x007F).all()


def _random_f32_patterns(rng: np.random.Generator, n: int) -> np.ndarray:
    """Uniform bit patterns, plus patterns concentrated on the float16 range and subnormals."""
    uniform = rng.integers(0, 2 ** 32, n, dtype=np.uint64).astype(np.uint32)
    exponent = rng.integers(96, 145, n // 2, dtype=np.uint64).astype(np.uint32)  # 2**-31 .. 2**17
    mantissa = rng.integers(0, 2 ** 23, n // 2, dtype=np.uint64).astype(np.uint32)
    sign = rng.integers(0, 2, n // 2, dtype=np.uint64).astype(np.uint32) << 31
    in_range = sign | (exponent << 23) | mantissa
    subnormal = rng.integers(0, 2 ** 23, n // 8, dtype=np.uint64).astype(np.uint32)
    return np.concatenate([uniform, in_range, subnormal, subnormal | np.uint32(0x80000000)]).view(np.float32)


def _f16_halfway_cases() -> np.ndarray:
    """Every float32 exactly halfway between two adjacent finite float16 values (and 1 ulp either
    side), including the subnormal range and the tie between 65504 and infinity."""
    finite = ALL16[(ALL16 & 0x7C00) != 0x7C00]
    base = floats.F16_TO_F32[finite]
    normal = (finite & 0x7C00) != 0
    bits = base[normal].view(np.uint32)
    halves = [bits + np.uint32(0x1000), bits + np.uint32(0x0FFF), bits + np.uint32(0x1001)]
    k = np.arange(1, 2 ** 11, 2, dtype=np.float64)  # odd multiples of 2**-25: subnormal ties
    sub = (k * 2.0 ** -25).astype(np.float32)
    subs = [sub, -sub, np.nextafter(sub, np.float32(0)), np.nextafter(sub, np.float32(1))]
    return np.concatenate([h.view(np.float32) for h in halves] + subs)


def _bf16_halfway_cases(rng: np.random.Generator, n: int) -> np.ndarray:
    high = rng.integers(0, 2 ** 16, n, dtype=np.uint64).astype(np.uint32) << 16
    return np.concatenate([high | np.uint32(low) for low in (0x8000, 0x7FFF, 0x8001)]).view(np.float32)


def test_f32_to_f16_matches_numpy_and_torch():
    rng = np.random.default_rng(2024)
    x = np.concatenate([_random_f32_patterns(rng, 1_500_000), _f16_halfway_cases(),
                        np.float32([65504, 65519.996, 65520, -65520, 65536, np.inf, -np.inf, 0, -0.0])])
    got = to_f16(x)
    with np.errstate(over="ignore", invalid="ignore"):
        expected = x.astype(np.float16).view(np.uint16)
    nan = np.isnan(x)
    assert (got[~nan] == expected[~nan]).all()
    assert is_nan16(got[nan], 0x7C00, 0x03FF).all()
    by_torch = torch.from_numpy(x).to(torch.float16).view(torch.int16).numpy().view(np.uint16)
    assert (got[~nan] == by_torch[~nan]).all()


def test_f32_to_bf16_matches_torch():
    rng = np.random.default_rng(4202)
    x = np.concatenate([_random_f32_patterns(rng, 1_500_000), _bf16_halfway_cases(rng, 200_000),
                        np.float32([3.4028235e38, -3.4028235e38, np.inf, -np.inf, 0, -0.0, 1e-45])])
    got = to_bf16(x)
    expected = torch.from_numpy(x).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    nan = np.isnan(x)
    assert nan.any()
    assert (got[~nan] == expected[~nan]).all()
    assert is_nan16(got[nan], 0x7F80, 0x007F).all()
    assert ((got[nan] & 0x40) != 0).all()  # quiet


@pytest.mark.parametrize("a_dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("b_dtype", [torch.bfloat16, torch.float16])
def test_difference_f32_is_torchs_widened_subtraction(a_dtype, b_dtype):
    """floats.difference_f32 (a full fine-tune's τ from 16-bit weights, one pass) gives the bits of
    ``a.float() - b.float()``: every 16-bit pattern against random ones, NaN and ±inf included."""
    rng = np.random.default_rng(17)
    a_bits = np.concatenate([np.arange(65536), rng.integers(0, 65536, 200_003)]).astype(np.uint16)
    b_bits = np.concatenate([rng.integers(0, 65536, 65536), a_bits[65536:][::-1]]).astype(np.uint16)
    b_bits[:1000] = a_bits[:1000]  # equal inputs: zeros of both signs
    a = torch.from_numpy(a_bits.view(np.int16)).view(a_dtype)
    b = torch.from_numpy(b_bits.view(np.int16)).view(b_dtype)
    out = np.empty(a_bits.size, np.float32)
    floats.difference_f32(a_bits, a_dtype == torch.bfloat16, b_bits, b_dtype == torch.bfloat16, floats.F16_TO_F32,
                          out)
    want = (a.float() - b.float()).numpy()
    nan = np.isnan(want)
    assert nan.any() and np.array_equal(np.isnan(out), nan)
    assert np.array_equal(out[~nan].view(np.uint32), want[~nan].view(np.uint32))


# ---------------------------------------------------------------------------------------------
# Golomb parameter selection


@pytest.mark.parametrize("m", FIXED_MS)
@pytest.mark.parametrize("density", [0.002, 0.05, 0.3, 1.0])
def test_fixed_m_round_trip(m, density):
    rng = np.random.default_rng(m * 1000 + int(density * 1000))
    n = 4000
    values = np.where(rng.random(n) < density, rng.standard_normal(n), 0).astype(np.float32)
    s = encode_with_m(values, 0.0, m, 37)
    payload = payload_bytes(s)
    assert reference.encode_payload(values, 0.0, m, 37) == (payload, s.nnz, s.unary_bits, s.high_bits)
    positions, signs = truth(values, 0.0)
    assert reference.decode_positions_signs(payload, numel=n, **header_of(s)) == (positions, signs)
    check_streams_by_arithmetic(payload, n, header_of(s), (positions, signs))
    if m == 2:
        assert s.high_bits == s.nnz and s.low.size == 0  # every entry long-form, no low stream
    if m == 1:
        assert s.high_bits == 0 and s.low.size == 0 and s.unary_bits == positions[-1] + 1  # q = gap
    dense = numba_dense(payload, n, header_of(s), np.uint32, f32_bits(1.0), f32_bits(-1.0), 7)
    expected = np.zeros(n, np.float32)
    expected[positions] = np.where(np.array(signs, bool), -1.0, 1.0)
    assert (dense == expected.view(np.uint32)).all()


@SETTINGS
@given(inputs(), chunk_sizes)
def test_encode_picks_cheapest_candidate(case, chunk_size):
    values, thr = case
    s = golomb.encode(values, thr, chunk_size)
    candidates = [int(m) for m in golomb.golomb_candidates(s.nnz, values.size)]
    assert s.golomb_m in candidates
    costs, counts = {}, {}
    for m in candidates:
        payload, nnz, ub, hb = reference.encode_payload(values, thr, m, chunk_size)
        assert nnz == s.nnz
        costs[m] = ub + nnz * low_width(m) + hb
        counts[m] = (ub, hb)
    assert s.unary_bits + s.nnz * low_width(s.golomb_m) + s.high_bits == costs[s.golomb_m] == min(costs.values())
    # the kernel's per-candidate counts equal the reference's
    nnz, _, got = golomb.gap_costs(values, thr, np.array(candidates, dtype=np.int64))
    assert nnz == s.nnz
    assert {m: (int(got[j, 0]), int(got[j, 1])) for j, m in enumerate(candidates)} == counts
    assert s.golomb_m == min(m for m in candidates if costs[m] == costs[s.golomb_m])  # ties: smallest m


@SETTINGS
@given(inputs(), chunk_sizes, st.integers(1, 700), st.sampled_from([1, 4, golomb.SHORT_GAPS]))
def test_encode_in_blocks_writes_the_bytes_of_one_pass(case, chunk_size, block, short):
    """A tensor cut into blocks of ``block`` values (golomb.ENCODE_BLOCK) is counted and written
    block by block in parallel, and gives the streams of one serial pass: blocks without a kept
    entry, gaps and chunks across block edges, words shared by neighbouring blocks, and gaps past
    the histogram (``short``) included."""
    values, thr = case
    saved = golomb.ENCODE_BLOCK, golomb.SHORT_GAPS
    try:
        golomb.ENCODE_BLOCK, golomb.SHORT_GAPS = block, short
        blocked = golomb.encode(values, thr, chunk_size)
    finally:
        golomb.ENCODE_BLOCK, golomb.SHORT_GAPS = saved
    whole = golomb.encode(values, thr, chunk_size)
    assert (blocked.nnz, blocked.golomb_m, blocked.unary_bits, blocked.high_bits) == \
        (whole.nnz, whole.golomb_m, whole.unary_bits, whole.high_bits)
    assert payload_bytes(blocked) == payload_bytes(whole)
    positions, signs = reference.kept_entries(values, thr)
    assert whole.nnz == len(positions)


@pytest.mark.parametrize("short", [1, 5, golomb.SHORT_GAPS])
def test_gap_costs_count_short_and_long_gaps_exactly(monkeypatch, short):
    """The encoder's one counting pass: gaps below SHORT_GAPS in a histogram, longer ones listed.
    Its per-candidate sizes equal the reference encoder's, whichever side each gap falls on
    (gaps of 0 up to ~9,000 here, a histogram of 1 and 5 entries forcing the list)."""
    monkeypatch.setattr(golomb, "SHORT_GAPS", short)
    rng = np.random.default_rng(short)
    values = np.zeros(40_000, np.float32)
    kept = np.unique(np.concatenate([[0, 1, 2, 4095, 4096, 4097, 8193, 8194],
                                     9000 + np.flatnonzero(rng.random(30_000) < 0.05), [39_999]]))
    values[kept] = (rng.choice([-1, 1], kept.size) * (1.5 + rng.random(kept.size))).astype(np.float32)
    values[5] = 0.5  # below the threshold: not kept
    candidates = np.array([1, 2, 3, 5, 8, 19, 64, 4096], dtype=np.int64)
    nnz, got_candidates, costs = golomb.gap_costs(values, 1.0, candidates)
    assert nnz == kept.size and got_candidates is candidates
    for j, m in enumerate(candidates):
        _, ref_nnz, unary_bits, high_bits = reference.encode_payload(values, 1.0, int(m), 64)
        assert (ref_nnz, int(costs[j, 0]), int(costs[j, 1])) == (nnz, unary_bits, high_bits), int(m)
    assert golomb.gap_costs(np.zeros(0, np.float32), 1.0)[0] == 0


# ---------------------------------------------------------------------------------------------
# corrupt payloads

NUMEL = 4000
CHUNK = 16
# "chosen": golomb.encode's own m (9 here: short and long forms, 3-bit low fields); m = 8: every
# entry long-form (cut 0); m = 2: no low stream, one high bit per entry; m = 1000: 9-bit low
# fields crossing words, few long-form entries
VALID_MS = ["chosen", 8, 2, 1000]


@pytest.fixture(scope="module", params=VALID_MS, ids=lambda m: f"m={m}")
def valid(request):
    rng = np.random.default_rng(99)
    values = np.where(rng.random(NUMEL) < 0.08, rng.standard_normal(NUMEL), 0).astype(np.float32)
    if request.param == "chosen":
        s = golomb.encode(values, 0.0, CHUNK)
        assert s.golomb_m > 2 and s.golomb_m & (s.golomb_m - 1)  # real short and long forms
    else:
        s = encode_with_m(values, 0.0, request.param, CHUNK)
    assert s.nnz > 8 * CHUNK and 0 < s.high_bits <= s.nnz  # several chunks, some high bits
    return payload_bytes(s), header_of(s), truth(values, 0.0)


def _guarded(dtype, fill: int):
    guard = 64
    big = np.full(NUMEL + 2 * guard, fill, dtype=dtype)
    return big, big[guard:guard + NUMEL], guard


def numba_outcome(payload, hdr: dict):
    """None when the Numba path rejects the payload with CorruptPayloadError, else the dense
    decode (written inside guard regions). Any other exception fails the test.

    The payload is also decoded straight away (no MODE_CHECK pass first) with MODE_DENSE and
    MODE_ADD_BF16 into guarded outputs: those must reject exactly when MODE_CHECK does, and never
    write outside their output."""
    try:
        streams = parse(payload, NUMEL, hdr)
        golomb.decode(streams, NUMEL, kernels.MODE_CHECK, np.empty(0, np.uint16), where="test", path=None)
        accepted = True
    except CorruptPayloadError:
        accepted = False
    for mode, dtype, fill in ((kernels.MODE_DENSE, np.uint32, 0xFFFFFFFF), (kernels.MODE_ADD_BF16, np.uint16, 0x3F80)):
        big, out, guard = _guarded(dtype, fill)
        try:
            golomb.decode(parse(payload, NUMEL, hdr, check=False), NUMEL, mode, out, delta=1.0, where="test",
                          path=None)
            direct = True
        except CorruptPayloadError:
            direct = False
        assert direct == accepted, mode
        assert (big[:guard] == fill).all() and (big[guard + NUMEL:] == fill).all(), "wrote out of bounds"
    if not accepted:
        return None
    return numba_dense(payload, NUMEL, hdr, np.uint32, 1, 2, 0xFFFFFFFF)


def reference_outcome(payload, hdr: dict):
    try:
        positions, signs = reference.decode_positions_signs(payload, numel=NUMEL, strict_padding=False, **hdr)
    except CorruptPayloadError:
        return None
    dense = np.zeros(NUMEL, np.uint32)
    dense[positions] = np.where(np.array(signs, bool), 2, 1)
    return dense


def _table_edit(row: int, col: int, value):
    def edit(table, hdr):
        table[row if row >= 0 else table.shape[0] + row, col] = value(table, hdr) if callable(value) else value
    return edit


def _swap_bases(table, hdr):
    table[[1, 2], 0] = table[[2, 1], 0]


def _swap_rows(table, hdr):
    table[[3, 4]] = table[[4, 3]]


def _high_offsets_shifted(table, hdr):
    """Every high offset after row 0 one lower (still within the stream, still ordered)."""
    table[1:, 2] = np.maximum(table[1:, 2] - 1, 0)


STRUCTURAL = {
    "bases swapped": _swap_bases,
    "rows swapped": _swap_rows,
    "base repeated": _table_edit(3, 0, lambda t, h: t[2, 0]),
    "base plus one": _table_edit(2, 0, lambda t, h: t[2, 0] + 1),
    "base minus one": _table_edit(2, 0, lambda t, h: t[2, 0] - 1),
    "last base at numel": _table_edit(-1, 0, NUMEL),
    "base far past numel": _table_edit(5, 0, 2 ** 62),
    "base negative": _table_edit(4, 0, -1),
    "first base not zero": _table_edit(0, 0, 1),
    "first unary offset not zero": _table_edit(0, 1, 1),
    "first high offset not zero": _table_edit(0, 2, 1),
    "unary offset past the stream": _table_edit(-1, 1, lambda t, h: h["unary_bits"] + 64),
    "unary offset huge": _table_edit(3, 1, 2 ** 63 - 1),
    "unary offset negative": _table_edit(3, 1, -5),
    "unary offset plus one": _table_edit(2, 1, lambda t, h: t[2, 1] + 1),
    "unary offset minus one": _table_edit(2, 1, lambda t, h: t[2, 1] - 1),
    "high offset past the stream": _table_edit(-1, 2, lambda t, h: h["high_bits"] + 1),
    "high offset at the end": _table_edit(1, 2, lambda t, h: h["high_bits"]),
    "high offset plus one": _table_edit(2, 2, lambda t, h: t[2, 2] + 1),
    "high offset minus one": _table_edit(2, 2, lambda t, h: t[2, 2] - 1),
    "high offset huge": _table_edit(1, 2, 2 ** 62),
    "high offset negative": _table_edit(3, 2, -1),
    "high offsets shifted": _high_offsets_shifted,
}


def _table_of(payload: bytes, hdr: dict) -> tuple[np.ndarray, np.ndarray]:
    words = np.frombuffer(payload, "<u8").copy()
    n_chunks = -(-hdr["nnz"] // hdr["chunk_size"])
    return words, words[:3 * n_chunks].view(np.int64).reshape(n_chunks, 3)


@pytest.mark.parametrize("name", sorted(STRUCTURAL))
def test_corrupt_chunk_table_is_rejected(valid, name):
    payload, hdr, _ = valid
    words, table = _table_of(payload, hdr)
    STRUCTURAL[name](table, hdr)
    corrupt = words.tobytes()
    if corrupt == payload:
        pytest.skip("the edit changes nothing for this payload")
    assert numba_outcome(corrupt, hdr) is None
    with pytest.raises(CorruptPayloadError):
        reference.decode_positions_signs(corrupt, numel=NUMEL, **hdr)
    with pytest.raises(CorruptPayloadError):
        reference.decode_positions_signs(corrupt, numel=NUMEL, strict_padding=False, **hdr)


def test_check_table_accepts_valid_and_flags_bad_rows(valid):
    payload, hdr, _ = valid
    words, table = _table_of(payload, hdr)
    args = (hdr["nnz"], NUMEL, hdr["chunk_size"], hdr["unary_bits"], hdr["high_bits"])
    assert kernels.check_table(table, *args) == kernels.OK
    for name, code in (("first base not zero", kernels.ERR_TABLE_START),
                       ("base far past numel", kernels.ERR_TABLE_RANGE),
                       ("high offset past the stream", kernels.ERR_TABLE_RANGE),
                       ("high offset negative", kernels.ERR_TABLE_RANGE),
                       ("unary offset negative", kernels.ERR_TABLE_RANGE),
                       ("base repeated", kernels.ERR_TABLE_ORDER)):
        bad = table.copy()
        STRUCTURAL[name](bad, hdr)
        assert kernels.check_table(bad, *args) == code, name
    # a chunk claiming more high bits than entries
    bad = table.copy()
    bad[2:, 2] = 0
    bad[1, 2] = 0
    bad[-1, 2] = 0
    assert kernels.check_table(bad, hdr["nnz"], NUMEL, hdr["chunk_size"], hdr["unary_bits"],
                               hdr["high_bits"] + 5 * hdr["chunk_size"]) == kernels.ERR_TABLE_BITS


def test_status_messages_cover_every_error():
    codes = {getattr(kernels, name) for name in dir(kernels) if name.startswith("ERR_")}
    assert codes == set(kernels.STATUS_MESSAGES) and kernels.OK not in codes
    assert not hasattr(kernels, "ERR_REMAINDER_OVERRUN") and not hasattr(kernels, "ERR_REMAINDER_END")


@pytest.mark.parametrize("unary_bits, high_bits", [(5, 0), (64, 0), (0, 3)])
def test_empty_tensor_with_stream_bits_is_rejected(unary_bits, high_bits):
    """nnz = 0 but the header claims unary or high bits: no entry uses them, so the payload is
    inconsistent (the reference rejects it even without strict padding)."""
    hdr = dict(nnz=0, golomb_m=3, chunk_size=4, unary_bits=unary_bits, high_bits=high_bits)
    payload = bytes(8 * sum(golomb.stream_words(0, 4, 3, unary_bits, high_bits)))
    assert len(payload) == 8
    with pytest.raises(CorruptPayloadError):
        reference.decode_positions_signs(payload, numel=100, strict_padding=False, **hdr)
    out = np.full(100, 7, np.uint32)
    try:
        streams = parse(payload, 100, hdr)
        golomb.decode(streams, 100, kernels.MODE_DENSE, out, positive=1, negative=2, where="test", path=None)
    except CorruptPayloadError:
        return
    raise AssertionError("the Numba path accepted the payload")


HEADER_EDITS = {
    "nnz minus one": ("nnz", -1),
    "nnz plus one": ("nnz", 1),
    "unary_bits minus one": ("unary_bits", -1),
    "unary_bits plus one": ("unary_bits", 1),
    "high_bits minus one": ("high_bits", -1),
    "high_bits plus one": ("high_bits", 1),
    "golomb_m plus one": ("golomb_m", 1),
    "golomb_m minus one": ("golomb_m", -1),
    "chunk_size plus one": ("chunk_size", 1),
}


@pytest.mark.parametrize("name", sorted(HEADER_EDITS))
def test_header_payload_mismatch_is_rejected(valid, name):
    payload, hdr, _ = valid
    key, step = HEADER_EDITS[name]
    bad = dict(hdr, **{key: hdr[key] + step})
    assert numba_outcome(payload, bad) is None
    with pytest.raises(CorruptPayloadError):
        reference.decode_positions_signs(payload, numel=NUMEL, **bad)


@pytest.mark.parametrize("cut", [8, 64, -8, -16])
def test_truncated_or_extended_payload_is_rejected(valid, cut):
    payload, hdr, _ = valid
    changed = payload[:-cut] if cut > 0 else payload + bytes(-cut)
    assert numba_outcome(changed, hdr) is None
    assert numba_outcome(b"", hdr) is None
    with pytest.raises(CorruptPayloadError):
        reference.decode_positions_signs(changed, numel=NUMEL, **hdr)


@pytest.mark.parametrize("cut", [1, 3])
def test_payload_truncated_mid_word_is_rejected(valid, cut):
    payload, hdr, _ = valid
    with pytest.raises(CorruptPayloadError):
        reference.decode_positions_signs(payload[:-cut], numel=NUMEL, **hdr)
    assert numba_outcome(payload[:-cut], hdr) is None


def _flip(payload: bytes, bits) -> bytes:
    data = bytearray(payload)
    for bit in bits:
        data[bit // 8] ^= 1 << (bit % 8)
    return bytes(data)


STREAMS = ["table", "unary", "low", "high", "signs"]


def _stream_range(hdr: dict, which: str) -> tuple[int, int, int]:
    """(first bit, used bits, padded bits) of a part of the payload."""
    nnz = hdr["nnz"]
    words = golomb.stream_words(nnz, hdr["chunk_size"], hdr["golomb_m"], hdr["unary_bits"], hdr["high_bits"])
    i = STREAMS.index(which)
    used = [64 * words[0], hdr["unary_bits"], nnz * low_width(hdr["golomb_m"]), hdr["high_bits"], nnz][i]
    return 64 * sum(words[:i]), used, 64 * words[i]


@pytest.mark.parametrize("where", ["unary", "low", "high", "signs", "anywhere"])
def test_bit_flips_never_escape(valid, where):
    """A flipped payload is rejected by both decoders or accepted by both with the same content,
    and the Numba decoder never writes outside its output."""
    payload, hdr, (positions, _) = valid
    rng = np.random.default_rng(STREAMS.index(where) if where in STREAMS else 6)
    if where == "anywhere":
        flips = [[int(b)] for b in rng.integers(0, len(payload) * 8, 300)]
    else:
        start, used, _ = _stream_range(hdr, where)
        if used < 16:
            pytest.skip(f"no {where} stream")
        # single flips, and pairs close together (which often still form a valid code)
        flips = [[start + int(b)] for b in rng.integers(0, used, 150)]
        for b in rng.integers(0, used - 8, 150):
            flips.append([start + int(b), start + int(b) + int(rng.integers(1, 8))])
    accepted = rejected = 0
    for bits in flips:
        corrupt = _flip(payload, bits)
        got, ref = numba_outcome(corrupt, hdr), reference_outcome(corrupt, hdr)
        assert (got is None) == (ref is None), bits
        if got is None:
            rejected += 1
        else:
            accepted += 1
            assert (got == ref).all(), bits
            assert np.count_nonzero(got) == hdr["nnz"]
    if where == "signs":
        assert rejected == 0  # every sign pattern is valid
    else:
        assert rejected > 0
    # (with m = 1000 every quotient is 0 and a high bit moves a position by 488: no unary or high
    # flip yields a valid code there)
    if not (hdr["golomb_m"] == 1000 and where in ("unary", "high")):
        assert accepted > 0


@pytest.mark.parametrize("which", ["unary", "low", "high", "signs"])
def test_padding_bits(valid, which):
    """Numba ignores set padding bits; the reference decoder rejects them unless told not to."""
    payload, hdr, truth_ = valid
    start, used, padded = _stream_range(hdr, which)
    if padded == used:
        pytest.skip(f"the {which} stream has no padding bits")
    for bit in (start + used, start + padded - 1):
        corrupt = _flip(payload, [bit])
        dense = numba_outcome(corrupt, hdr)
        assert dense is not None and np.flatnonzero(dense).tolist() == truth_[0]
        with pytest.raises(CorruptPayloadError, match="padding"):
            reference.decode_positions_signs(corrupt, numel=NUMEL, **hdr)
        assert reference.decode_positions_signs(corrupt, numel=NUMEL, strict_padding=False, **hdr) == truth_


def test_payloads_of_one_read_are_decoded_in_place():
    """pack(share=True): streams parsed from views of one buffer (the payloads of one read) are
    decoded from that buffer itself, not a copy; anything else (streams from several buffers, or
    not parsed from one) is concatenated; both decode the same."""
    rng = np.random.default_rng(3)
    tensors = [(rng.standard_normal(n) * (rng.random(n) < 0.2)).astype(np.float32) for n in (1000, 50, 40000)]
    streams = [golomb.encode(v, 0.0, 64) for v in tensors]
    assert all(s.nnz for s in streams)
    blob = b"".join(payload_bytes(s) for s in streams) + b"\0" * 3  # (a trailing partial word, as after a dense payload)
    view, at, parsed = memoryview(blob), 0, []
    for s, v in zip(streams, tensors):
        n = len(payload_bytes(s))
        parsed.append(parse(view[at:at + n], v.size, header_of(s)))
        at += n
    words, params = golomb.pack([(s, v.size) for s, v in zip(parsed, tensors)], share=True)
    assert words.__array_interface__["data"][0] == np.frombuffer(blob, np.uint8).__array_interface__["data"][0]
    copied, copied_params = golomb.pack([(s, v.size) for s, v in zip(streams, tensors)], share=True)
    assert copied.size == sum(len(payload_bytes(s)) for s in streams) // 8  # owner None: concatenated
    for w, p in ((words, params), (copied, copied_params)):
        p[:, kernels.P_POSITIVE], p[:, kernels.P_NEGATIVE] = 1, 2
        status = np.zeros(len(tensors), np.int64)
        kernels.check_tables(w, p, status)
        assert not status.any()
        work = golomb.chunk_work((p[:, kernels.P_UNARY] - p[:, kernels.P_TABLE]) // 3)
        outs = [np.full(v.size, 7, np.uint32) for v in tensors]
        status = np.zeros(work.shape[0], np.int64)
        kernels.decode_golomb(w, p, outs, None, np.zeros(len(tensors)), work,
                              kernels.MODE_DENSE, kernels.F16_TO_F32, status)
        assert not status.any()
        for out, v in zip(outs, tensors):
            assert np.array_equal(out, np.where(v > 0, 1, np.where(v < 0, 2, 0)).astype(np.uint32))
    mixed = [parse(memoryview(bytes(view[:len(payload_bytes(streams[0]))])), tensors[0].size, header_of(streams[0])),
             parsed[1]]
    mixed_words, _ = golomb.pack([(s, v.size) for s, v in zip(mixed, tensors)], share=True)
    assert mixed_words.size == (len(payload_bytes(streams[0])) + len(payload_bytes(streams[1]))) // 8
