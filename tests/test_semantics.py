"""ComPEFT semantics of ``compeft.compress`` against a direct torch implementation (conftest)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import compeft
from compeft.errors import CompeftError, SourceError

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
DTYPE_CODES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}


def assert_matches_reference(expert, ref, tensors, same):
    assert expert.names == sorted(tensors)
    for name, original in tensors.items():
        got = expert.to_dense(name)
        want = ref.values[name]
        assert got.dtype == original.dtype, name
        assert tuple(got.shape) == tuple(original.shape), name
        assert torch.equal(got, want), name
        if name in ref.masks:
            e = expert.entry(name)
            assert e.compressed
            assert e.nnz == int(ref.masks[name].sum())
            assert e.scale == ref.scales[name]
        else:
            assert same(got, want), name


# ---------------------------------------------------------------------------------------------
# scopes


@pytest.mark.parametrize("scope", ["global", "tensor"])
@pytest.mark.parametrize("density", [1e-4, 0.01, 0.1, 0.37, 0.5, 0.99, 1.0])
def test_scopes_match_reference(scope, density, make_tv, reference, same):
    tv = make_tv(seed=int(density * 1000), zeros=0.1)
    tv["z.half"] = torch.randn(5, 7, generator=torch.Generator().manual_seed(3)).half() * 3
    tv["z.bf16"] = torch.randn(33, generator=torch.Generator().manual_seed(4)).bfloat16() / 7
    expert = compeft.compress(tv, density=density, alpha=1.7, scope=scope)
    ref = reference(tv, density, 1.7, scope)
    assert_matches_reference(expert, ref, tv, same)
    # the kept entries are exactly the reference masks (every scale here is far from 0)
    for name in tv:
        assert torch.equal(expert.to_dense(name) != 0, ref.masks[name]), name
    meta = expert.metadata
    assert meta["scope"] == scope and meta["density"] == density and meta["alpha"] == 1.7
    if scope == "global":
        any_name = ref.compressed[0]
        assert meta["threshold"] == ref.thresholds[any_name]
        assert meta["sigma"] == pytest.approx(ref.sigmas[any_name], rel=1e-12)


def test_global_and_tensor_scope_differ_as_specified(reference):
    g = torch.Generator().manual_seed(0)
    tv = {"big": torch.randn(1000, generator=g) * 100, "small": torch.randn(1000, generator=g)}
    glob = compeft.compress(tv, density=0.1, alpha=1.0, scope="global")
    per = compeft.compress(tv, density=0.1, alpha=1.0, scope="tensor")
    # global: rank 2000 - 200 = 1800 over 2000 entries; |τ| >= the 1800th smallest keeps 201
    # entries (the reference keeps floor(d·k) + 1 without ties), all from the large tensor
    assert glob.entry("big").nnz == 201 and glob.entry("small").nnz == 0
    # global: one scale (sigma over all 2000 entries) for both tensors
    sigma = float(torch.cat([tv["big"], tv["small"]]).double().std())
    assert glob.entry("big").scale == float(np.float32(sigma))
    # tensor: each keeps its own 10% with its own sigma
    assert per.entry("big").nnz == 101 and per.entry("small").nnz == 101
    assert per.entry("small").scale == float(np.float32(float(tv["small"].double().std())))
    assert "threshold" not in per.metadata and "sigma" not in per.metadata


# ---------------------------------------------------------------------------------------------
# selection rules


def test_ties_at_threshold_are_all_kept(reference):
    t = torch.tensor([1.0] * 50 + [0.5] * 50 + [-1.0] * 50 + [0.25] * 50)
    # rank = 200 - floor(200 * 0.1) = 180: the 180th smallest |τ| is 1.0, shared by 100 entries
    expert = compeft.compress({"w": t}, density=0.1, alpha=1.0, scope="global")
    assert expert.metadata["threshold"] == 1.0
    assert expert.entry("w").nnz == 100
    out = expert.to_dense("w")
    sigma = float(np.float32(float(t.double().std())))
    assert torch.equal(out, torch.where(t.abs() >= 1.0, torch.sign(t) * sigma, torch.zeros(())))
    assert torch.equal(out, reference({"w": t}, 0.1).values["w"])


def test_ties_below_threshold_are_not_kept():
    t = torch.tensor([3.0, 2.0, 2.0, 2.0, 1.0])
    expert = compeft.compress({"w": t}, density=0.2, alpha=1.0, scope="global")  # rank 4: threshold 2.0, keeps 3.0 and all 2.0
    assert expert.entry("w").nnz == 4
    assert expert.to_dense("w")[-1] == 0


def test_density_one_keeps_every_nonzero():
    t = torch.tensor([0.0, -3.0, 1e-30, 0.0, 2.0, -1e-38])
    expert = compeft.compress({"w": t}, density=1.0, alpha=1.0, scope="global")
    assert expert.metadata["threshold"] == 0.0
    out = expert.to_dense("w")
    assert torch.equal(out != 0, t != 0)
    assert torch.equal(torch.sign(out), torch.sign(t))


@pytest.mark.parametrize("density", [1e-12, 1e-6, 0.0009])
def test_tiny_density_keeps_the_maximum(density):
    g = torch.Generator().manual_seed(1)
    t = torch.randn(1000, generator=g)
    expert = compeft.compress({"w": t}, density=density, alpha=1.0, scope="global")
    out = expert.to_dense("w")
    assert expert.entry("w").nnz == 1
    assert out.nonzero().flatten().tolist() == [int(t.abs().argmax())]
    assert torch.sign(out[t.abs().argmax()]) == torch.sign(t[t.abs().argmax()])


def test_tiny_density_keeps_every_tied_maximum():
    t = torch.tensor([0.1, -5.0, 2.0, 5.0, -5.0, 0.0])
    expert = compeft.compress({"w": t}, density=1e-9, alpha=1.0, scope="global")
    assert expert.to_dense("w").nonzero().flatten().tolist() == [1, 3, 4]


def test_zeros_are_never_kept():
    t = torch.zeros(100)
    t[::10] = torch.arange(1, 11, dtype=torch.float32)
    # 90% zeros: at density 0.5 the threshold is 0, yet only the 10 nonzeros are kept
    expert = compeft.compress({"w": t}, density=0.5, alpha=1.0, scope="global")
    assert expert.metadata["threshold"] == 0.0
    assert expert.entry("w").nnz == 10
    assert torch.equal(expert.to_dense("w") != 0, t != 0)


def test_all_zero_task_vector():
    tv = {"a": torch.zeros(4, 4), "b": torch.zeros(3, dtype=torch.bfloat16)}
    for density in (1e-3, 0.5, 1.0):
        expert = compeft.compress(tv, density=density, alpha=1.0, scope="global")
        for name in tv:
            assert expert.entry(name).nnz == 0 and expert.entry(name).scale == 0.0
            assert torch.equal(expert.to_dense(name), tv[name])


def test_negative_zero_is_a_zero():
    t = torch.tensor([-0.0, 0.0, -0.0, 1.0, -2.0, -0.0])
    for density in (0.5, 1.0):
        expert = compeft.compress({"w": t}, density=density, alpha=1.0, scope="global")
        out = expert.to_dense("w")
        assert expert.entry("w").nnz == 2
        # entries that are not kept decode to +0.0, whatever the sign of the input zero
        assert not torch.signbit(out[t == 0]).any()
    only_negative_zeros = compeft.compress({"w": torch.full((7,), -0.0)}, density=1.0, alpha=1.0, scope="global")
    assert only_negative_zeros.entry("w").nnz == 0


def test_sigma_is_unbiased_over_all_entries_including_zeros():
    t = torch.zeros(100)
    t[0], t[1] = 3.0, -3.0
    expert = compeft.compress({"w": t}, density=0.01, alpha=2.0, scope="global")
    sigma = math.sqrt(18.0 / 99.0)  # mean 0, sum of squares 18, d - 1 = 99
    assert expert.entry("w").scale == float(np.float32(2.0 * sigma))
    assert expert.entry("w").nnz == 2


def test_single_entry_scope_has_zero_sigma():
    expert = compeft.compress({"w": torch.tensor([4.0])}, density=1.0, alpha=1.0, scope="tensor")
    assert expert.entry("w").nnz == 1 and expert.entry("w").scale == 0.0


def test_alpha_zero_is_refused():
    """α = 0 would store a mask whose every value is 0: an expert that does nothing (issue 14)."""
    from compeft.errors import InvalidArgumentError
    t = torch.randn(50, generator=torch.Generator().manual_seed(5))
    with pytest.raises(InvalidArgumentError, match="alpha must be a finite number > 0"):
        compeft.compress({"w": t}, density=0.2, alpha=0.0, scope="global")


def test_selection_over_every_float32_exponent(reference):
    k = torch.arange(-149, 128, dtype=torch.float64)
    g = torch.Generator().manual_seed(0)
    values = (2.0 ** k).float() * torch.where(torch.rand(k.shape, generator=g) < 0.5, -1.0, 1.0)
    values = torch.cat([values, values * 1.5, torch.tensor([torch.finfo(torch.float32).max, 0.0, -0.0])])
    tv = {"a": values[:300], "b": values[300:]}
    for density in (1e-3, 0.1, 0.3, 0.5, 0.77, 0.999):
        for scope in ("global", "tensor"):
            expert = compeft.compress(tv, density=density, scope=scope, alpha=1e-30)
            ref = reference(tv, density, 1e-30, scope)
            for name in tv:
                assert expert.entry(name).nnz == int(ref.masks[name].sum()), (density, scope, name)
                assert torch.equal(expert.to_dense(name), ref.values[name]), (density, scope, name)


@pytest.mark.parametrize("density", [0.01, 0.5, 0.86])
def test_selection_on_a_large_tensor_with_many_ties(density, reference):
    rng = np.random.default_rng(0)
    values = (rng.standard_normal(300_000) * 10.0 ** rng.integers(-6, 6, 300_000)).astype(np.float32)
    values[::7] = 0.5
    values[::11] = 0.0
    tv = {"w": torch.from_numpy(values)}
    expert = compeft.compress(tv, density=density, alpha=1.0, scope="global")
    ref = reference(tv, density)
    assert expert.metadata["threshold"] == ref.thresholds["w"]
    assert expert.metadata["sigma"] == pytest.approx(ref.sigmas["w"], rel=1e-12)
    assert expert.entry("w").nnz == int(ref.masks["w"].sum())
    assert torch.equal(expert.to_dense("w"), ref.values["w"])


def test_empty_and_integer_only_task_vectors(roundtrip):
    for tv in ({}, {"ids": torch.arange(3)}, {"e": torch.zeros(0, 4)}, {"s": torch.tensor(2.5)}):
        expert = roundtrip(compeft.compress(tv, density=0.5, alpha=1.0, scope="global"))
        assert expert.names == sorted(tv)
        assert expert.metadata["threshold"] == (2.5 if "s" in tv else 0.0)
        for name, t in tv.items():
            out = expert.to_dense(name)
            assert out.shape == t.shape and out.dtype == t.dtype
        expert.verify()


# ---------------------------------------------------------------------------------------------
# dtypes and verbatim tensors


@pytest.mark.parametrize("dtype", DTYPES)
def test_floating_dtypes_come_back_in_their_dtype(dtype, reference, roundtrip):
    t = (torch.randn(6, 5, 4, generator=torch.Generator().manual_seed(2)) * 0.01).to(dtype)
    expert = compeft.compress({"w": t}, density=0.3, alpha=3.0, scope="global")
    assert expert.entry("w").dtype == DTYPE_CODES[dtype]
    for e in (expert, roundtrip(expert)):
        out = e.to_dense("w")
        assert out.dtype == dtype and out.shape == t.shape
        want = torch.tensor(float(np.float32(3.0 * float(t.double().std()))), dtype=torch.float32).to(dtype)
        kept = out[out != 0]
        assert torch.equal(kept.abs(), want.expand_as(kept))
        assert torch.equal(out, reference({"w": t}, 0.3, 3.0).values["w"])
        assert e.to_dense("w", dtype=torch.float64).dtype == torch.float64


def test_verbatim_tensors_are_stored_dense(reference, roundtrip, same):
    g = torch.Generator().manual_seed(7)
    tv = {
        "a.weight": torch.randn(8, 8, generator=g),
        "a.bias": torch.randn(8, generator=g),
        "b.bias": torch.randn(4, generator=g).bfloat16(),
        "ids": torch.arange(10, dtype=torch.int64).reshape(2, 5),
        "mask": torch.tensor([True, False, True]),
        "bytes": torch.tensor([1, 2, 255], dtype=torch.uint8),
        "small": torch.tensor([-3, 4], dtype=torch.int8),
        "double": torch.randn(3, 3, generator=g, dtype=torch.float64),
        "empty_ids": torch.zeros(0, 2, dtype=torch.int32),
    }
    expert = compeft.compress(tv, density=0.25, keep_dense=["*.bias"], alpha=1.0, scope="global")
    dense = {"a.bias", "b.bias", "ids", "mask", "bytes", "small", "double", "empty_ids"}
    for e in (expert, roundtrip(expert)):
        for name, original in tv.items():
            entry = e.entry(name)
            assert (entry.encoding == "dense") == (name in dense), name
            if name in dense:
                assert same(e.to_dense(name), original), name
    # verbatim tensors are outside the global scope: only a.weight is compressed
    ref = reference(tv, 0.25, 1.0, "global", ["*.bias"])
    assert ref.compressed == ["a.weight"]
    assert torch.equal(expert.to_dense("a.weight"), ref.values["a.weight"])
    assert expert.entry("a.weight").nnz == 17  # 64 - floor(64 * 0.25) = rank 48: 17 entries >= it


@pytest.mark.parametrize("scope", ["global", "tensor"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_task_vector_raises(scope, dtype, bad):
    t = torch.randn(10).to(dtype)
    t[3] = bad
    with pytest.raises(SourceError, match="w2"):
        compeft.compress({"w1": torch.randn(4), "w2": t}, density=0.5, scope=scope)


def test_input_tensors_are_not_modified_and_layout_does_not_matter(reference):
    base = torch.randn(12, 9, generator=torch.Generator().manual_seed(9))
    view = base.t()  # non-contiguous
    grad = base.clone().requires_grad_(True)
    before = base.clone()
    a = compeft.compress({"w": view}, density=0.2, alpha=1.0, scope="global")
    b = compeft.compress({"w": view.contiguous()}, density=0.2, alpha=1.0, scope="global")
    c = compeft.compress({"w": grad.t()}, density=0.2, alpha=1.0, scope="global")
    assert torch.equal(base, before)
    assert torch.equal(a.to_dense("w"), b.to_dense("w"))
    assert torch.equal(a.to_dense("w"), c.to_dense("w"))
    assert torch.equal(a.to_dense("w"), reference({"w": view}, 0.2).values["w"])


def test_compression_is_deterministic(make_tv, workdir):
    tv = make_tv(seed=11)
    a = compeft.compress(tv, density=0.3, metadata={"k": "v"}, alpha=1.0, scope="global")
    b = compeft.compress(tv, density=0.3, metadata={"k": "v"}, alpha=1.0, scope="global")
    a.save(workdir / "a.cpeft")
    b.save(workdir / "b.cpeft")
    assert (workdir / "a.cpeft").read_bytes() == (workdir / "b.cpeft").read_bytes()


def test_chunk_size_does_not_change_the_result(make_tv, reference):
    tv = make_tv(seed=12)
    ref = reference(tv, 0.4)
    for chunk_size in (1, 2, 7, 64, 1 << 20):
        expert = compeft.compress(tv, density=0.4, chunk_size=chunk_size, alpha=1.0, scope="global")
        for name in tv:
            assert torch.equal(expert.to_dense(name), ref.values[name])
            e = expert.entry(name)  # (a packed tensor is one chunk of all its entries)
            assert e.chunk_size == (max(e.nnz, 1) if e.encoding == "ternary-golomb-packed" else chunk_size)


# ---------------------------------------------------------------------------------------------
# property: compress -> save -> open -> to_dense == in-memory == reference

shapes = st.lists(st.integers(0, 6), min_size=0, max_size=3).map(tuple)
PALETTE = [0.0, -0.0, 0.5, -0.5, 1.0, -1.0, 2.0, 1e-3, -1e-3]


@st.composite
def task_vectors(draw):
    n = draw(st.integers(1, 4))
    names = draw(st.lists(st.from_regex(r"[a-z][a-z0-9_.]{0,8}", fullmatch=True), min_size=n, max_size=n,
                          unique=True))
    out = {}
    for name in names:
        shape = draw(shapes)
        dtype = draw(st.sampled_from(DTYPES))
        kind = draw(st.sampled_from(["normal", "palette", "sparse"]))
        numel = math.prod(shape)
        rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
        if kind == "palette":  # many ties and signed zeros
            values = rng.choice(np.array(PALETTE, dtype=np.float32), size=numel)
        else:
            values = (rng.standard_normal(numel) * 10.0 ** rng.integers(-3, 3)).astype(np.float32)
            if kind == "sparse":
                values[rng.random(numel) < 0.8] = 0.0
        out[name] = torch.from_numpy(values.reshape(shape)).to(dtype)
    return out


densities = st.one_of(st.sampled_from([1.0, 0.5, 1e-9]), st.floats(1e-6, 1.0, allow_nan=False,
                                                                    exclude_min=False))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(tv=task_vectors(), density=densities, scope=st.sampled_from(["global", "tensor"]),
       alpha=st.one_of(st.just(1e-3), st.floats(1e-3, 10.0, allow_nan=False)),
       chunk_size=st.sampled_from([1, 3, 16384]))
def test_roundtrip_property(tv, density, scope, alpha, chunk_size, reference, roundtrip, same):
    expert = compeft.compress(tv, density=density, alpha=alpha, scope=scope, chunk_size=chunk_size)
    reopened = roundtrip(expert)
    ref = reference(tv, density, alpha, scope)
    assert reopened.names == expert.names == sorted(tv)
    assert reopened.metadata == expert.metadata
    for name in tv:
        memory, disk = expert.to_dense(name), reopened.to_dense(name)
        assert same(memory, disk), name
        assert memory.dtype == tv[name].dtype and memory.shape == tv[name].shape
        assert torch.equal(disk, ref.values[name]), name
        assert reopened.entry(name).nnz == int(ref.masks[name].sum())
        assert reopened.entry(name).scale == ref.scales[name]
    reopened.verify()


@settings(max_examples=25, deadline=None)
@given(density=st.one_of(st.just(0.0), st.just(-0.5), st.just(float("nan")), st.just(float("inf")),
                         st.floats(1.0, 1e6, exclude_min=True)))
def test_density_outside_range_is_rejected(density):
    with pytest.raises(CompeftError):
        compeft.compress({"w": torch.ones(3)}, density=density, alpha=1.0, scope="global")
