"""The decode operations of compeft.codec.kernels (one chunk walker, one driver per operation) and
the checks golomb.decode_many makes before any kernel runs.

test_codec.py checks check / dense / scatter / add_* against the independent references; here:
TIES and the DARE drops against a naive numpy reading, the Golomb field arithmetic's Python and
Numba twins against each other, the operation/dtype checks, and that every driver stays cacheable.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from compeft.codec import golomb, kernels
from compeft.errors import InvalidArgumentError
from compeft.format.header import golomb_fields, golomb_width

M64 = (1 << 64) - 1


def splitmix64(x: int) -> int:
    z = (x + 0x9E3779B97F4A7C15) & M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M64
    return z ^ (z >> 31)


def sparse(seed: int, n: int, density: float) -> tuple[np.ndarray, golomb.GolombStreams]:
    rng = np.random.default_rng(seed)
    values = np.where(rng.random(n) < density, rng.standard_normal(n), 0).astype(np.float32)
    return values, golomb.encode(values, 0.0, int(rng.integers(1, 200)))


def f32(bits: np.ndarray) -> np.ndarray:
    return bits.view(np.float32)


# ---------------------------------------------------------------------------------------------
# Golomb field arithmetic: the Python definition and its Numba twin


@settings(max_examples=300, deadline=None)
@given(st.integers(1, 2 ** 40))
@example(1)
@example(2)
@example(3)
@example(2 ** 40)
@example(2 ** 39 + 1)
def test_golomb_fields_python_and_numba_agree(m):
    fields = golomb_fields(m)
    assert tuple(int(x) for x in kernels.golomb_fields(m)) == tuple(fields)
    b, w, cut, half = fields
    assert b == golomb_width(m) and 2 ** b >= m and (b == 0 or 2 ** (b - 1) < m)
    assert w == max(b - 1, 0)
    if m == 1:
        assert (cut, half) == (1, 0)  # no remainder: x = 0 is never long-form
    else:  # every remainder r < m has exactly one code: short forms x < cut, long forms x + h·half
        assert cut == 2 ** b - m and half == 2 ** (b - 1) - cut and 0 <= cut < 2 ** w
        assert cut + 2 * half == m and half >= 1


def test_golomb_fields_rejects_m_below_one():
    with pytest.raises(ValueError):
        golomb_fields(0)


# ---------------------------------------------------------------------------------------------
# TIES and DARE against a naive reading of the kept entries


def kept(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    pos = np.flatnonzero(values != 0)
    return pos, values[pos] < 0


def dropped(key: int, cut: int, count: int) -> np.ndarray:
    return np.array([(splitmix64(key + e) >> 1) < cut for e in range(count)], dtype=bool)


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 2 ** 32 - 1), st.integers(1, 4000), st.sampled_from([0.01, 0.2, 1.0]),
       st.sampled_from([0.0, 0.25, 0.9]), st.integers(0, 2 ** 62))
def test_ties_and_dare_match_naive(seed, n, density, p, key):
    values, s = sparse(seed, n, density)
    pos, neg = kept(values)
    cut = int(p * 2 ** 63)
    drop = dropped(key, cut, pos.size)
    rng = np.random.default_rng(seed + 1)
    step = np.float32(rng.choice([0.5, 1e-3, 3.0, 0.0]))  # a zero step adds -0.0 for negative entries
    start = rng.standard_normal(n).astype(np.float32)
    # Entries that do not count (dropped, or against the elected sign) leave every bit as it was,
    # -0.0 and NaN payloads included: the kernels add -0.0 there instead of branching.
    special = np.array([-0.0, 0.0, np.inf, -np.inf, np.nan], np.float32)
    special = np.append(special, np.uint32(0xFFC00123).view(np.float32))  # a negative quiet NaN with a payload
    odd = rng.random(n) < 0.2
    start[odd] = rng.choice(special, int(odd.sum()))
    signed = np.where(neg, -step, step).astype(np.float32)

    # add_f32 with drops
    out = start.copy().view(np.uint32)
    golomb.decode(s, n, kernels.MODE_ADD_F32, out, delta=float(step), drop_key=key, drop_cut=cut, where="t", path=None)
    expected = start.copy()
    keep = pos[~drop]
    expected[keep] = expected[keep] + signed[~drop]
    assert (out == expected.view(np.uint32)).all()

    # TIES with drops: where the sign agrees with the elected one (a zero sum elects +)
    aux = rng.standard_normal(n).astype(np.float32)
    aux[rng.random(n) < 0.1] = 0.0
    aux[rng.random(n) < 0.05] = -0.0  # not below zero: elects +, like 0.0
    acc = np.concatenate([start, np.zeros(n, np.float32)])
    out = acc.copy().view(np.uint32)
    golomb.decode(s, n, kernels.MODE_TIES, out, delta=float(step), aux=aux, drop_key=key, drop_cut=cut, where="t",
                  path=None)
    agree = ~drop & ((aux[pos] < 0) == neg)
    expected = acc.copy()
    expected[pos[agree]] = expected[pos[agree]] + signed[agree]
    expected[n + pos[agree]] += np.float32(1)
    assert (out == expected.view(np.uint32)).all()

    # no drops: every entry counts (the plain drivers)
    out = acc.copy().view(np.uint32)
    golomb.decode(s, n, kernels.MODE_TIES, out, delta=float(step), aux=aux, where="t", path=None)
    agree = (aux[pos] < 0) == neg
    expected = acc.copy()
    expected[pos[agree]] = expected[pos[agree]] + signed[agree]
    expected[n + pos[agree]] += np.float32(1)
    assert (out == expected.view(np.uint32)).all()


def test_drops_pick_the_dare_driver_only_for_merge_modes():
    values, s = sparse(3, 3000, 0.2)
    words, params = golomb.pack([(s, values.size)])
    params[0, kernels.P_DROP_CUT] = 1 << 62
    work = golomb.chunk_work(np.array([s.table.shape[0]]))
    with pytest.raises(InvalidArgumentError):
        kernels.decode_golomb(words, params, [np.zeros(values.size, np.uint32)], None,
                              np.ones(1, np.float32), work, kernels.MODE_DENSE, kernels.F16_TO_F32,
                              np.zeros(work.shape[0], np.int64))
    with pytest.raises(InvalidArgumentError):
        kernels.decode_golomb(words, params, [np.zeros(1, np.uint32)], None,
                              np.ones(1, np.float32), work, 99, kernels.F16_TO_F32, np.zeros(work.shape[0], np.int64))


@pytest.mark.parametrize("bad", ["dtype", "strided", "readonly", "2d", "not an array"])
def test_outputs_must_be_contiguous_writeable_arrays_of_one_dtype(bad):
    """The drivers write through each output's address: decode_golomb refuses any array the
    address table could not describe exactly, before a kernel runs."""
    values, s = sparse(4, 3000, 0.2)
    words, params = golomb.pack([(s, values.size)])
    work = golomb.chunk_work(np.array([s.table.shape[0]]))
    out = np.zeros(values.size, np.uint32)
    first = np.zeros(values.size, np.uint32)
    if bad == "dtype":
        outs = [first, np.zeros(values.size, np.uint16)]
        words, params = golomb.pack([(s, values.size), (s, values.size)])
        work = golomb.chunk_work(np.array([s.table.shape[0]] * 2))
    elif bad == "strided":
        outs = [np.zeros(2 * values.size, np.uint32)[::2]]
    elif bad == "readonly":
        out.flags.writeable = False
        outs = [out]
    elif bad == "2d":
        outs = [out.reshape(1, -1)]
    else:
        outs = [out.tolist()]
    with pytest.raises(InvalidArgumentError, match="1-D, contiguous, writeable"):
        kernels.decode_golomb(words, params, outs, None, np.ones(len(outs), np.float32), work, kernels.MODE_DENSE,
                              kernels.F16_TO_F32, np.zeros(work.shape[0], np.int64))
    assert not first.any()


@pytest.mark.parametrize("mode, outs, auxs", [
    (kernels.MODE_CHECK, "out", None),  # check writes nothing: no outputs
    (kernels.MODE_DENSE, None, None),
    (kernels.MODE_DENSE, "out", "aux"),  # only ties reads aux arrays
    (kernels.MODE_TIES, "out", None),
    (kernels.MODE_DENSE, "two outs", None)])
def test_decode_takes_exactly_the_arrays_its_mode_uses(mode, outs, auxs):
    values, s = sparse(4, 3000, 0.2)
    words, params = golomb.pack([(s, values.size)])
    work = golomb.chunk_work(np.array([s.table.shape[0]]))
    size = 2 * values.size if mode == kernels.MODE_TIES else values.size
    out = [np.zeros(size, np.uint32)] * (2 if outs == "two outs" else 1) if outs else None
    aux = [np.zeros(values.size, np.float32)] if auxs else None
    with pytest.raises(InvalidArgumentError, match="per parameter row|ties only"):
        kernels.decode_golomb(words, params, out, aux, np.ones(1, np.float32), work, mode, kernels.F16_TO_F32,
                              np.zeros(work.shape[0], np.int64))


def test_a_fresh_process_decodes_without_compiling(tmp_path):
    """Everything a decode runs is in Numba's on-disk cache (no typed list, whose methods Numba
    compiles in every process): once the cache is warm, a new process compiles nothing."""
    import subprocess
    import sys

    import torch

    import compeft

    compeft.compress({"a": torch.randn(300, 40), "b": torch.randn(5000).to(torch.bfloat16)}, density=0.2).save(
        tmp_path / "x.cpeft")
    code = """if True:
        from numba.core import event
        compiled = []
        class Listener(event.Listener):
            def on_start(self, ev): compiled.append(ev)
            def on_end(self, ev): pass
        event.register("numba:compile", Listener())
        import sys, compeft
        e = compeft.open(sys.argv[1])
        e.verify(); e.state_dict(); print(len(compiled))
    """
    counts = [subprocess.run([sys.executable, "-c", code, str(tmp_path / "x.cpeft")], capture_output=True, text=True,
                             check=True).stdout.split()[-1] for _ in range(2)]
    assert counts[1] == "0", counts


def test_every_mode_has_a_driver_and_every_driver_is_cacheable():
    """Each operation's kernel compiles on its own, with its begin and visit resolved at compile time:
    nothing the compiled code holds refers to a live Python object (which would make Numba
    refuse to cache it, and recompile the drivers in every process)."""
    assert set(kernels.DRIVERS) == set(kernels.MODES) and set(kernels.DARE_DRIVERS) == set(kernels.DARE_MODES)
    values, s = sparse(5, 2000, 0.1)
    n = values.size
    aux = np.ones(n, np.float32)
    runs = [(kernels.MODE_CHECK, np.empty(0, np.uint16), {}), (kernels.MODE_DENSE, np.zeros(n, np.uint16), {}),
            (kernels.MODE_DENSE, np.zeros(n, np.uint32), {}), (kernels.MODE_SCATTER, np.zeros(n, np.uint32), {}),
            (kernels.MODE_SCATTER, np.zeros(n, np.uint16), {}), (kernels.MODE_ADD_F32, np.zeros(n, np.uint32), {}),
            (kernels.MODE_ADD_BF16, np.zeros(n, np.uint16), {}), (kernels.MODE_ADD_F16, np.zeros(n, np.uint16), {}),
            (kernels.MODE_TIES, np.zeros(2 * n, np.uint32), dict(aux=aux)),
            (kernels.MODE_ADD_F32, np.zeros(n, np.uint32), dict(drop_key=1, drop_cut=1 << 61)),
            (kernels.MODE_TIES, np.zeros(2 * n, np.uint32), dict(aux=aux, drop_key=1, drop_cut=1 << 61))]
    for mode, out, extra in runs:
        golomb.decode(s, n, mode, out, positive=1, negative=2, delta=1.0, where="t", path=None, **extra)
    compiled = [getattr(kernels, name) for name in dir(kernels)
                if name.endswith(("_chunk", "_chunks")) and name != "walk_chunk"]  # (walk_chunk is inlined)
    assert len(compiled) == 2 * len(kernels.DRIVERS) + 2 * len(kernels.DARE_DRIVERS) + 1  # + tally_chunk (check)
    for driver in compiled:
        dispatcher = driver if hasattr(driver, "overloads") else driver.__wrapped__  # threads.serialized
        # the parallel drivers (*_chunks) were just called; a per-chunk callee (*_chunk) has no
        # overload of its own when its caller came from Numba's on-disk cache
        assert dispatcher.overloads or dispatcher.py_func.__name__.endswith("_chunk"), dispatcher
        for cres in dispatcher.overloads.values():
            assert not cres.library.has_dynamic_globals, dispatcher


# ---------------------------------------------------------------------------------------------
# the operation is checked against its output before any kernel runs


@pytest.fixture(scope="module")
def small():
    values, s = sparse(11, 500, 0.1)
    return s, values.size


def check_rejects(s, n, mode, out, match, **kwargs):
    before = None if out is None else out.copy()
    with pytest.raises(InvalidArgumentError, match=match):
        golomb.decode(s, n, mode, out, where="t", path=None, **kwargs)
    if before is not None:
        assert (out == before).all(), "written before the error"


@pytest.mark.parametrize("mode, dtype", [
    (kernels.MODE_DENSE, np.float32), (kernels.MODE_DENSE, np.int32), (kernels.MODE_DENSE, np.uint64),
    (kernels.MODE_SCATTER, np.uint8), (kernels.MODE_SCATTER, np.int16),
    (kernels.MODE_ADD_F32, np.uint16), (kernels.MODE_ADD_F32, np.float32),
    (kernels.MODE_ADD_BF16, np.uint32), (kernels.MODE_ADD_F16, np.uint32), (kernels.MODE_ADD_F16, np.float16),
    (kernels.MODE_TIES, np.uint16), (kernels.MODE_TIES, np.float32)])
def test_output_dtype_must_fit_the_mode(small, mode, dtype):
    s, n = small
    size = 2 * n if mode == kernels.MODE_TIES else n
    aux = np.zeros(n, np.float32) if mode == kernels.MODE_TIES else None
    check_rejects(s, n, mode, np.full(size, 7, dtype), "writes", aux=aux)


@pytest.mark.parametrize("mode, dtype", [(kernels.MODE_DENSE, np.uint16), (kernels.MODE_SCATTER, np.uint32),
                                         (kernels.MODE_ADD_F32, np.uint32), (kernels.MODE_ADD_BF16, np.uint16),
                                         (kernels.MODE_TIES, np.uint32)])
@pytest.mark.parametrize("size", ["short", "long", "2-d"])
def test_output_must_be_flat_with_its_entries(small, mode, dtype, size):
    s, n = small
    want = 2 * n if mode == kernels.MODE_TIES else n
    out = {"short": np.zeros(want - 1, dtype), "long": np.zeros(want + 1, dtype),
           "2-d": np.zeros((1, want), dtype)}[size]
    aux = np.zeros(n, np.float32) if mode == kernels.MODE_TIES else None
    check_rejects(s, n, mode, out, f"flat with {want} entries", aux=aux)


def test_ties_needs_numel_entries_of_each_half(small):
    """A TIES output of numel entries (not 2·numel) is refused, as the kernel would count past it."""
    s, n = small
    check_rejects(s, n, kernels.MODE_TIES, np.zeros(n, np.uint32), f"flat with {2 * n} entries",
                  aux=np.zeros(n, np.float32))


@pytest.mark.parametrize("aux", ["missing", "float64", "short", "2-d", "strided"])
def test_ties_needs_a_float32_aux_of_numel(small, aux):
    s, n = small
    arr = {"missing": None, "float64": np.zeros(n), "short": np.zeros(n - 1, np.float32),
           "2-d": np.zeros((1, n), np.float32), "strided": np.zeros(2 * n, np.float32)[::2]}[aux]
    check_rejects(s, n, kernels.MODE_TIES, np.zeros(2 * n, np.uint32), "aux", aux=arr)


@pytest.mark.parametrize("mode, dtype", [(kernels.MODE_DENSE, np.uint32), (kernels.MODE_ADD_F32, np.uint32),
                                         (kernels.MODE_ADD_BF16, np.uint16)])
def test_aux_is_only_for_ties(small, mode, dtype):
    s, n = small
    check_rejects(s, n, mode, np.zeros(n, dtype), "aux", aux=np.zeros(n, np.float32))


@pytest.mark.parametrize("mode, dtype", [(kernels.MODE_DENSE, np.uint32), (kernels.MODE_SCATTER, np.uint16),
                                         (kernels.MODE_ADD_BF16, np.uint16), (kernels.MODE_ADD_F16, np.uint16),
                                         (kernels.MODE_CHECK, np.uint16)])
def test_drops_are_only_for_merge_passes(small, mode, dtype):
    s, n = small
    out = np.zeros(n if mode != kernels.MODE_CHECK else 0, dtype)
    check_rejects(s, n, mode, out, "drops no entries", drop_key=3, drop_cut=1 << 60)


@pytest.mark.parametrize("key, cut", [(-1, 5), (0, 1 << 63), (1 << 63, 1)])
def test_drop_key_and_cut_must_fit_63_bits(small, key, cut):
    s, n = small
    check_rejects(s, n, kernels.MODE_ADD_F32, np.zeros(n, np.uint32), "2\\*\\*63", drop_key=key, drop_cut=cut)


@pytest.mark.parametrize("positive, negative", [(0x10000, 1), (1, 0x18000), (-1, 0)])
def test_value_patterns_must_fit_the_output(small, positive, negative):
    s, n = small
    check_rejects(s, n, kernels.MODE_DENSE, np.zeros(n, np.uint16), "patterns", positive=positive, negative=negative)
    assert np.iinfo(np.uint32).max >= 0x18000  # the same patterns fit a float32 output
    golomb.decode(s, n, kernels.MODE_DENSE, np.zeros(n, np.uint32), positive=max(positive, 0), negative=negative,
                  where="t", path=None)


def test_output_must_be_contiguous_and_writeable(small):
    s, n = small
    check_rejects(s, n, kernels.MODE_DENSE, np.zeros(2 * n, np.uint32)[::2], "contiguous")
    frozen = np.zeros(n, np.uint32)
    frozen.flags.writeable = False
    check_rejects(s, n, kernels.MODE_ADD_F32, frozen, "writeable")


def test_unknown_mode_is_rejected(small):
    s, n = small
    for mode in (-1, 7, 99):
        check_rejects(s, n, mode, np.zeros(n, np.uint32), "unknown decode mode")


def test_a_bad_job_stops_the_batch_before_anything_is_written(small):
    """Every job is checked before the first write: an empty tensor's zero-fill included."""
    s, n = small
    empty = golomb.encode(np.zeros(40, np.float32), 0.0)
    first = np.full(40, 9, np.uint32)
    good = np.full(n, 9, np.uint32)
    jobs = [golomb.DecodeJob(empty, 40, first, "empty"), golomb.DecodeJob(s, n, good, "good", 1, 2),
            golomb.DecodeJob(s, n, np.zeros(n, np.float32), "bad", 1, 2)]
    with pytest.raises(InvalidArgumentError, match="bad"):
        golomb.decode_many(jobs, kernels.MODE_DENSE, None)
    assert (first == 9).all() and (good == 9).all()
    golomb.decode_many(jobs[:2], kernels.MODE_DENSE, None)
    assert (first == 0).all() and (good != 9).all()


def test_check_ignores_the_output(small):
    s, n = small
    golomb.decode(s, n, kernels.MODE_CHECK, np.zeros(3, np.float64), where="t", path=None)
