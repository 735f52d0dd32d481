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

from compeft.codec import golomb, kernels, reference
from compeft.errors import CorruptPayloadError

SETTINGS = settings(max_examples=80, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

FIXED_MS = [1, 2, 3, 5, 8, 13, 1000]
TORCH_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


# ---------------------------------------------------------------------------------------------
# helpers


def payload_bytes(s: golomb.GolombStreams) -> bytes:
    return b"".join(bytes(part) for part in s.payload_parts())


def header_of(s: golomb.GolombStreams) -> dict:
    return dict(nnz=s.nnz, golomb_m=s.golomb_m, chunk_size=s.chunk_size, unary_bits=s.unary_bits,
                remainder_bits=s.remainder_bits)


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
    costs = np.zeros((1, 2), dtype=np.int64)
    nnz = int(kernels.count_gap_costs(values, thr, np.array([m], dtype=np.int64), costs))
    unary_bits, remainder_bits = int(costs[0, 0]), int(costs[0, 1])
    table = np.zeros((-(-nnz // chunk_size), 3), dtype=np.int64)
    unary = np.zeros(-(-unary_bits // 64), dtype=np.uint64)
    remainders = np.zeros(-(-remainder_bits // 64), dtype=np.uint64)
    signs = np.zeros(-(-nnz // 64), dtype=np.uint64)
    got = kernels.encode_golomb(values, thr, m, chunk_size, table, unary, remainders, signs)
    assert tuple(int(x) for x in got) == (nnz, unary_bits, remainder_bits)
    return golomb.GolombStreams(nnz, m, chunk_size, unary_bits, remainder_bits, table, unary, remainders, signs)


def parse(payload, numel: int, hdr: dict) -> golomb.GolombStreams:
    return golomb.parse_payload(payload, numel=numel, where="test", path=None, **hdr)


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


def test_reference_layout_by_hand():
    # positions 0, 4, 5, 13 with m = 3, chunk_size 2: gaps 0, 3, 0, 7 -> q 0, 1, 0, 2; r 0, 0, 0, 1
    v = np.zeros(16, np.float32)
    v[[0, 4, 5, 13]] = [1, -1, 1, -1]
    payload, nnz, ub, rb = reference.encode_payload(v, 0.5, 3, 2)
    assert (nnz, ub, rb) == (4, 4 + 3, 1 + 1 + 1 + 2)
    words = np.frombuffer(payload, "<u8")
    assert words[:6].tolist() == [0, 0, 0, 5, 3, 2]  # chunk 1 starts after position 4, unary bit 3, rem bit 2
    assert words[6] == 0b1001101  # unary, bit 0 first: 1 | 0 1 | 1 | 0 0 1
    assert words[7] == 0b01000  # remainders, bit 0 first: 0 | 0 | 0 | r=1: j=0, field 1 in 2 bits: 1 0
    assert words[8] == 0b1010  # signs
    assert reference.decode_positions_signs(payload, nnz=4, numel=16, golomb_m=3, chunk_size=2, unary_bits=ub,
                                            remainder_bits=rb) == ([0, 4, 5, 13], [0, 1, 0, 1])


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
        payload, s.nnz, s.unary_bits, s.remainder_bits)
    assert len(payload) == s.payload_length
    expected = truth(values, thr)
    assert reference.decode_positions_signs(payload, numel=values.size, **header_of(s)) == expected

    forced = encode_with_m(values, thr, m, chunk_size)
    assert reference.encode_payload(values, thr, m, chunk_size) == (
        payload_bytes(forced), forced.nnz, forced.unary_bits, forced.remainder_bits)
    assert reference.decode_positions_signs(payload_bytes(forced), numel=values.size,
                                            **header_of(forced)) == expected


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
        out[i] = kernels.f32_to_f16_bits(a[i])


@njit(cache=True)
def _to_bf16(a, out):
    for i in range(a.shape[0]):
        out[i] = kernels.f32_to_bf16_bits(a[i])


@njit(cache=True)
def _from_bf16(h, out):
    for i in range(h.shape[0]):
        out[i] = kernels.bf16_bits_to_f32(h[i])


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
    f32 = kernels.F16_TO_F32
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
    base = kernels.F16_TO_F32[finite]
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
    assert reference.encode_payload(values, 0.0, m, 37) == (payload, s.nnz, s.unary_bits, s.remainder_bits)
    positions, signs = truth(values, 0.0)
    assert reference.decode_positions_signs(payload, numel=n, **header_of(s)) == (positions, signs)
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
    costs = {}
    for m in candidates:
        _, nnz, ub, rb = reference.encode_payload(values, thr, m, chunk_size)
        assert nnz == s.nnz
        costs[m] = ub + rb
    assert s.unary_bits + s.remainder_bits == costs[s.golomb_m] == min(costs.values())
    assert s.golomb_m == min(m for m in candidates if costs[m] == costs[s.golomb_m])  # ties: smallest m


# ---------------------------------------------------------------------------------------------
# corrupt payloads

NUMEL = 4000
CHUNK = 16


@pytest.fixture(scope="module")
def valid():
    rng = np.random.default_rng(99)
    values = np.where(rng.random(NUMEL) < 0.08, rng.standard_normal(NUMEL), 0).astype(np.float32)
    s = golomb.encode(values, 0.0, CHUNK)
    assert s.nnz > 8 * CHUNK and s.golomb_m > 2  # several chunks, real remainder fields
    return payload_bytes(s), header_of(s), truth(values, 0.0)


def numba_outcome(payload, hdr: dict):
    """None when the Numba path rejects the payload with CorruptPayloadError, else the dense
    decode (written inside guard regions). Any other exception fails the test."""
    try:
        streams = parse(payload, NUMEL, hdr)
        golomb.decode(streams, NUMEL, kernels.MODE_CHECK, np.empty(0, np.uint16), where="test", path=None)
    except CorruptPayloadError:
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


STRUCTURAL = {
    "bases swapped": _swap_bases,
    "base repeated": _table_edit(3, 0, lambda t, h: t[2, 0]),
    "base plus one": _table_edit(2, 0, lambda t, h: t[2, 0] + 1),
    "base minus one": _table_edit(2, 0, lambda t, h: t[2, 0] - 1),
    "last base at numel": _table_edit(-1, 0, NUMEL),
    "base far past numel": _table_edit(5, 0, 2 ** 62),
    "base negative": _table_edit(4, 0, -1),
    "first base not zero": _table_edit(0, 0, 1),
    "first unary offset not zero": _table_edit(0, 1, 1),
    "unary offset past the stream": _table_edit(-1, 1, lambda t, h: h["unary_bits"] + 64),
    "unary offset huge": _table_edit(3, 1, 2 ** 63 - 1),
    "unary offset negative": _table_edit(3, 1, -5),
    "unary offset plus one": _table_edit(2, 1, lambda t, h: t[2, 1] + 1),
    "remainder offset past the stream": _table_edit(-1, 2, lambda t, h: h["remainder_bits"] + 1),
    "remainder offset minus one": _table_edit(2, 2, lambda t, h: t[2, 2] - 1),
    "remainder offset huge": _table_edit(1, 2, 2 ** 62),
}


@pytest.mark.parametrize("name", sorted(STRUCTURAL))
def test_corrupt_chunk_table_is_rejected(valid, name):
    payload, hdr, _ = valid
    words = np.frombuffer(payload, "<u8").copy()
    n_chunks = -(-hdr["nnz"] // hdr["chunk_size"])
    table = words[:3 * n_chunks].view(np.int64).reshape(n_chunks, 3)
    STRUCTURAL[name](table, hdr)
    corrupt = words.tobytes()
    assert corrupt != payload
    assert numba_outcome(corrupt, hdr) is None
    with pytest.raises(CorruptPayloadError):
        reference.decode_positions_signs(corrupt, numel=NUMEL, **hdr)


HEADER_EDITS = {
    "nnz minus one": ("nnz", -1),
    "nnz plus one": ("nnz", 1),
    "unary_bits minus one": ("unary_bits", -1),
    "unary_bits plus one": ("unary_bits", 1),
    "remainder_bits minus one": ("remainder_bits", -1),
    "remainder_bits plus one": ("remainder_bits", 1),
    "golomb_m plus one": ("golomb_m", 1),
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


def _stream_range(hdr: dict, which: int) -> tuple[int, int]:
    """Bit range [start, start + used bits) of stream ``which`` (0 table, 1 unary, 2 remainder, 3 signs)."""
    n_chunks = -(-hdr["nnz"] // hdr["chunk_size"])
    sizes = [3 * n_chunks * 64, -(-hdr["unary_bits"] // 64) * 64, -(-hdr["remainder_bits"] // 64) * 64]
    used = [sizes[0], hdr["unary_bits"], hdr["remainder_bits"], hdr["nnz"]]
    return sum(sizes[:which]), used[which]


@pytest.mark.parametrize("where", ["unary", "anywhere"])
def test_bit_flips_never_escape(valid, where):
    """A flipped payload is rejected by both decoders or accepted by both with the same content,
    and the Numba decoder never writes outside its output."""
    payload, hdr, (positions, _) = valid
    rng = np.random.default_rng(5 if where == "unary" else 6)
    if where == "unary":
        start, used = _stream_range(hdr, 1)
        # single flips, and pairs close together (which often still form a valid code)
        flips = [[start + int(b)] for b in rng.integers(0, used, 150)]
        for b in rng.integers(0, used - 8, 150):
            flips.append([start + int(b), start + int(b) + int(rng.integers(1, 8))])
    else:
        flips = [[int(b)] for b in rng.integers(0, len(payload) * 8, 300)]
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
    assert rejected > 0 and accepted > 0


def test_padding_bits(valid):
    """Numba ignores set padding bits; the reference decoder rejects them unless told not to."""
    payload, hdr, truth_ = valid
    start, used = _stream_range(hdr, 1)
    padded = -(-used // 64) * 64
    assert padded > used
    corrupt = _flip(payload, [start + padded - 1])
    dense = numba_outcome(corrupt, hdr)
    assert dense is not None and np.flatnonzero(dense).tolist() == truth_[0]
    with pytest.raises(CorruptPayloadError, match="padding"):
        reference.decode_positions_signs(corrupt, numel=NUMEL, **hdr)
    assert reference.decode_positions_signs(corrupt, numel=NUMEL, strict_padding=False, **hdr) == truth_
