"""``compeft.merge``: task arithmetic, soups, TIES and DARE straight from compressed streams.

The references are PEFT's own merge rules (``peft.utils.merge_utils``) applied to the decoded
dense experts (``expert.to_dense(name).float()``), plus hand-made cases whose exact float32 values
are written out, and the DARE rules (drop rate, rescaling, seeding) checked statistically.
"""

from __future__ import annotations

import json
import math
import re
import warnings
from pathlib import Path

import numba
import numpy as np
import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from peft.utils import merge_utils
from safetensors.torch import save_file

import compeft
from compeft.errors import BaseMismatchError, CompeftError, InvalidArgumentError
from compeft.expert import CompressedExpert
from compeft.merging import METHODS, MergeResult

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
F32 = np.float32


# ---------------------------------------------------------------------------------------------
# helpers


def random_tv(seed: int, shapes: dict[str, tuple[int, ...]], dtype: torch.dtype = torch.float32,
              dtypes: dict[str, torch.dtype] | None = None) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    dtypes = dtypes or {}
    return {n: (torch.randn(s, generator=g) * (0.5 + i)).to(dtypes.get(n, dtype))
            for i, (n, s) in enumerate(sorted(shapes.items()))}


def make_experts(n: int, shapes: dict[str, tuple[int, ...]], *, densities=None, scope: str = "global",
                 dtype: torch.dtype = torch.float32, dtypes=None, keep_dense=(), seed: int = 0,
                 chunk_size: int | None = None) -> list[CompressedExpert]:
    densities = densities or [0.1 + 0.8 * i / max(n - 1, 1) for i in range(n)]
    extra = {} if chunk_size is None else {"chunk_size": chunk_size}
    return [compeft.compress(random_tv(seed * 1000 + i, shapes, dtype, dtypes), density=densities[i], alpha=1.0, scope=scope,
                             keep_dense=keep_dense, **extra) for i in range(n)]


def dense(experts, name: str) -> list[torch.Tensor]:
    return [e.to_dense(name).float() for e in experts]


def peft_ties(tensors, weights, lam):
    with warnings.catch_warnings():  # PEFT warns that density 1 prunes nothing: compressed experts are trimmed
        warnings.simplefilter("ignore")
        return merge_utils.ties(tensors, torch.tensor(weights), density=1.0, majority_sign_method="total") * lam


def peft_task_arithmetic(tensors, weights, lam):
    return merge_utils.task_arithmetic(tensors, torch.tensor(weights)) * lam


def peft_reference(method: str, tensors, weights, lam, normalize: bool = True):
    if method == "ties":
        return peft_ties(tensors, weights, lam)
    if method == "linear" and normalize:
        total = sum(weights)
        weights = [w / total for w in weights]
    return peft_task_arithmetic(tensors, weights, lam)


def assert_matches_peft(experts, result, method, weights, lam, normalize=True):
    assert isinstance(result, MergeResult)
    assert list(result) == experts[0].names
    for name in experts[0].names:
        got = result[name]
        assert got.dtype == torch.float32
        assert tuple(got.shape) == tuple(experts[0].entry(name).shape)
        want = peft_reference(method, dense(experts, name), weights, lam, normalize)
        # With ternary experts every kept entry of expert i is ±v_i, so TIES' sign sums are exact
        # (or at worst rounded identically in both orders) and the result is usually bit-equal;
        # task arithmetic rounds w·v·λ in another order than PEFT, hence a tolerance.
        torch.testing.assert_close(got, want, rtol=2e-6, atol=2e-6, msg=lambda m: f"{method} {name}: {m}")


def ternary_expert(signs: list[list[int]], magnitude: float) -> CompressedExpert:
    """An expert whose one tensor ``w`` decodes to exactly ``magnitude * signs`` (a power of two)."""
    tau = torch.tensor(signs, dtype=torch.float32)
    flat = tau.double().reshape(-1).numpy()
    mean = math.fsum(flat) / flat.size
    sigma = math.sqrt(math.fsum((flat - mean) ** 2) / (flat.size - 1))
    expert = compeft.compress({"w": tau}, density=1.0, alpha=magnitude / sigma)
    assert torch.equal(expert.to_dense("w"), tau * magnitude)  # exact: σ·(m/σ) rounds to m in float32
    return expert


# ---------------------------------------------------------------------------------------------
# 1. against PEFT on the decoded experts

SHAPES = {"layer.0.weight": (24, 16), "layer.0.bias": (24,), "layer.1.weight": (8, 24, 3)}


@pytest.mark.parametrize("method", ["ties", "task_arithmetic", "linear"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("scope", ["global", "tensor"])
@pytest.mark.parametrize("n", [2, 5, 8])
def test_matches_peft(method, dtype, scope, n):
    experts = make_experts(n, SHAPES, scope=scope, dtype=dtype, seed=n)
    weights = [(-1) ** i * (0.25 + 0.6 * i) for i in range(n)]
    if sum(weights) == 0:
        weights[0] += 1.0
    result = compeft.merge(experts, method=method, weights=weights, lam=0.7)
    assert_matches_peft(experts, result, method, weights, 0.7)


def test_matches_peft_mixed_dtypes_and_densities():
    dtypes = {"layer.0.weight": torch.bfloat16, "layer.0.bias": torch.float16, "layer.1.weight": torch.float32}
    experts = make_experts(4, SHAPES, densities=[0.05, 0.3, 0.6, 1.0], dtypes=dtypes, scope="tensor")
    experts.append(compeft.compress(random_tv(99, SHAPES), density=0.2))  # all float32 this time
    weights = [1.0, 0.5, 2.0, -0.3, 0.8]
    for method in ("ties", "task_arithmetic", "linear"):
        assert_matches_peft(experts, compeft.merge(experts, method=method, weights=weights, lam=1.3), method,
                            weights, 1.3)


def test_linear_normalizes_and_default_weights():
    experts = make_experts(3, SHAPES)
    weights = [1.0, 2.0, 5.0]
    soup = compeft.merge(experts, method="linear", weights=weights)
    assert_matches_peft(experts, soup, "linear", weights, 1.0)
    raw = compeft.merge(experts, method="linear", weights=weights, normalize=False)
    assert_matches_peft(experts, raw, "task_arithmetic", weights, 1.0)
    ta = compeft.merge(experts, method="task_arithmetic", weights=weights)
    for name in experts[0].names:
        assert torch.equal(raw[name], ta[name])  # linear without normalisation *is* task arithmetic
        torch.testing.assert_close(soup[name] * sum(weights), ta[name], rtol=1e-5, atol=1e-5)
    # default weights: 1 each (task arithmetic = plain sum, linear = mean)
    plain = compeft.merge(experts)
    mean = compeft.merge(experts, method="linear")
    for name in experts[0].names:
        torch.testing.assert_close(plain[name], sum(dense(experts, name)), rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(mean[name], sum(dense(experts, name)) / 3, rtol=1e-6, atol=1e-6)
    assert plain.metadata["weights"] == [1.0, 1.0, 1.0]
    # normalize only concerns linear
    ta2 = compeft.merge(experts, method="task_arithmetic", weights=weights, normalize=True)
    for name in experts[0].names:
        assert torch.equal(ta2[name], ta[name])


def test_single_expert_is_scaled_expert():
    (expert,) = make_experts(1, SHAPES, densities=[0.3])
    for method in ("ties", "task_arithmetic"):
        result = compeft.merge([expert], method=method, weights=[0.5], lam=2.0)
        for name in expert.names:
            assert torch.equal(result[name], expert.to_dense(name).float())  # 0.5 · 2 = 1, exactly


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_matches_peft_property(data):
    n = data.draw(st.integers(2, 8), label="experts")
    ndim = data.draw(st.integers(1, 3), label="ndim")
    shapes = {f"t{j}": tuple(data.draw(st.lists(st.integers(1, 9), min_size=ndim, max_size=ndim), label=f"shape{j}"))
              for j in range(data.draw(st.integers(1, 3), label="tensors"))}
    dtype = data.draw(st.sampled_from(DTYPES), label="dtype")
    scope = data.draw(st.sampled_from(["global", "tensor"]), label="scope")
    densities = data.draw(st.lists(st.floats(0.01, 1.0), min_size=n, max_size=n), label="densities")
    weights = data.draw(st.lists(st.floats(-3, 3, allow_nan=False).filter(lambda w: abs(w) > 1e-3), min_size=n,
                                 max_size=n), label="weights")
    lam = data.draw(st.floats(-2, 2, allow_nan=False), label="lam")
    method = data.draw(st.sampled_from(["ties", "task_arithmetic", "linear"]), label="method")
    if method == "linear" and abs(sum(weights)) < 0.1:
        weights[0] += 1.0 if sum(weights) >= 0 else -1.0
    seed = data.draw(st.integers(0, 2 ** 20), label="seed")
    experts = make_experts(n, shapes, densities=densities, scope=scope, dtype=dtype, seed=seed)
    result = compeft.merge(experts, method=method, weights=weights, lam=lam)
    for name in experts[0].names:
        want = peft_reference(method, dense(experts, name), weights, lam)
        torch.testing.assert_close(result[name], want, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# 2. exact TIES semantics on a hand-made case

# four experts with magnitudes 1, 1, 2, 4 (exact in float32); columns are positions
SIGNS = [
    # p0  p1  p2  p3  p4  p5  p6  p7  p8  p9
    [+1, +1, -1, +1, 0, 0, +1, -1, +1, -1],
    [-1, +1, -1, 0, 0, 0, +1, 0, +1, -1],
    [0, -1, +1, 0, 0, -1, -1, 0, +1, -1],
    [0, 0, 0, 0, 0, 0, +1, +1, +1, -1],
]
MAGNITUDES = [1.0, 1.0, 2.0, 4.0]
TIES_WEIGHTS = [4.0, 0.5, 3.0, 0.125]


def test_ties_exact_hand_made():
    experts = [ternary_expert([row], m) for row, m in zip(SIGNS, MAGNITUDES)]
    lam = 0.5
    got = compeft.merge(experts, method="ties", weights=TIES_WEIGHTS, lam=lam)["w"][0]
    w, v = [F32(x) for x in TIES_WEIGHTS], [F32(x) for x in MAGNITUDES]
    wv = [w[i] * v[i] for i in range(4)]
    L = F32(lam)
    want = [
        wv[0] * L,  # p0: 1 − 1 = 0 elects +: expert 0 alone
        (wv[0] + wv[1]) / F32(2) * L,  # p1: 1 + 1 − 2 = 0 elects +: two agree, the majority by count loses nothing
        wv[2] * L,  # p2: −1 − 1 + 2 = 0 elects +: the single + entry wins over two − entries
        wv[0] * L,  # p3: a lone entry
        F32(0.0),  # p4: no expert has an entry: nobody agrees, 0
        -wv[2] * L,  # p5: a lone negative entry elects −
        ((wv[0] + wv[1]) + wv[3]) / F32(3) * L,  # p6: 1 + 1 − 2 + 4 elects +: three agree (in expert order)
        wv[3] * L,  # p7: −1 + 4 = 3 unweighted elects + (weighted: −4 + 0.5 < 0 would elect −)
        (((wv[0] + wv[1]) + wv[2]) + wv[3]) / F32(4) * L,  # p8: all agree (+)
        -((((wv[0] + wv[1]) + wv[2]) + wv[3]) / F32(4)) * L,  # p9: all agree (−)
    ]
    assert got.tolist() == [float(x) for x in want], (got.tolist(), want)
    assert got.tolist() == [2.0, 1.125, 3.0, 2.0, 0.0, -3.0, float(F32(5) / F32(3) * L), 0.25, 1.375, -1.375]
    assert not torch.signbit(got[4])  # +0.0 where nobody agrees
    # and PEFT agrees, bit for bit on this case
    tensors = dense(experts, "w")
    assert torch.equal(got, peft_ties(tensors, TIES_WEIGHTS, lam)[0])
    # the same τ̃ kept dense (experts 1 and 3, or all) follows the same rules, zero sums included
    dense_kept = [compeft.compress({"w": t}, keep_dense=["w"]) for t in tensors]
    assert dense_kept[0].entry("w").encoding != experts[0].entry("w").encoding
    for mix in ([experts[0], dense_kept[1], experts[2], dense_kept[3]], dense_kept):
        mixed = compeft.merge(mix, method="ties", weights=TIES_WEIGHTS, lam=lam)["w"][0]
        assert mixed.tolist() == got.tolist()


def test_task_arithmetic_and_linear_exact_hand_made():
    experts = [ternary_expert([row], m) for row, m in zip(SIGNS, MAGNITUDES)]
    tau = torch.tensor(SIGNS, dtype=torch.float32) * torch.tensor(MAGNITUDES)[:, None]
    ta = compeft.merge(experts, method="task_arithmetic", weights=TIES_WEIGHTS, lam=0.5)["w"][0]
    assert ta.tolist() == (0.5 * (torch.tensor(TIES_WEIGHTS)[:, None] * tau).sum(0)).tolist()  # all exact
    soup = compeft.merge(experts, method="linear", weights=[1.0, 1.0, 1.0, 1.0])["w"][0]
    assert soup.tolist() == (tau.sum(0) / 4).tolist()


def test_ties_negative_weight_uses_unweighted_election():
    # +1 (mag 1) and −1 (mag 2) at one position: the unweighted sum −1 elects −, whatever the weights
    a, b = ternary_expert([[1, 1, 0]], 1.0), ternary_expert([[-1, 1, 0]], 2.0)
    got = compeft.merge([a, b], method="ties", weights=[10.0, -1.0])["w"][0]
    assert got.tolist() == [2.0, (10.0 - 2.0) / 2, 0.0]
    assert torch.equal(got, peft_ties(dense([a, b], "w"), [10.0, -1.0], 1.0)[0])


# ---------------------------------------------------------------------------------------------
# 3. DARE


def test_dare_seed_reproducible_and_sensitive(same):
    experts = make_experts(3, SHAPES, densities=[0.5, 0.5, 0.7])
    for method in ("dare_linear", "dare_ties"):
        a = compeft.merge(experts, method=method, drop_rate=0.4, seed=7, weights=[1.0, 0.5, 2.0])
        b = compeft.merge(experts, method=method, drop_rate=0.4, seed=7, weights=[1.0, 0.5, 2.0])
        c = compeft.merge(experts, method=method, drop_rate=0.4, seed=8, weights=[1.0, 0.5, 2.0])
        for name in experts[0].names:
            assert same(a[name], b[name])
        assert any(not torch.equal(a[n], c[n]) for n in experts[0].names)
        assert not torch.equal(a["layer.0.weight"], c["layer.0.weight"])  # 384 entries: surely differs


def test_dare_zero_drop_rate_is_plain_merge(same):
    experts = make_experts(4, SHAPES, keep_dense=["layer.0.bias"])
    weights = [0.3, 1.0, -0.7, 2.0]
    pairs = [("dare_linear", "task_arithmetic"), ("dare_ties", "ties")]
    for dare, plain in pairs:
        a = compeft.merge(experts, method=dare, drop_rate=0.0, seed=123, weights=weights, lam=0.9)
        b = compeft.merge(experts, method=plain, weights=weights, lam=0.9)
        for name in experts[0].names:
            assert same(a[name], b[name]), (dare, name)


def one_hot_pruned(experts, method_seed, drop_rate, name):
    """Expert i's DARE-pruned and rescaled tensor, as dare_linear sees it at index i (the other
    experts weighted 0 add only ±0)."""
    out = []
    for i in range(len(experts)):
        w = [1.0 if j == i else 0.0 for j in range(len(experts))]
        out.append(compeft.merge(experts, method="dare_linear", weights=w, drop_rate=drop_rate,
                                 seed=method_seed)[name])
    return out


@pytest.mark.parametrize("keep_dense", [(), ("layer.0.bias",)])
def test_dare_is_peft_merge_of_pruned_experts(keep_dense):
    experts = make_experts(3, SHAPES, densities=[0.4, 0.6, 0.9], keep_dense=keep_dense)
    weights, p, seed = [0.7, 1.5, -0.4], 0.35, 11
    lin = compeft.merge(experts, method="dare_linear", weights=weights, drop_rate=p, seed=seed, lam=0.8)
    ties = compeft.merge(experts, method="dare_ties", weights=weights, drop_rate=p, seed=seed, lam=0.8)
    survived = entries = 0
    for name in experts[0].names:
        pruned = one_hot_pruned(experts, seed, p, name)
        for t, full in zip(pruned, dense(experts, name)):
            kept = t != 0
            assert bool((full[kept] != 0).all())  # survivors are kept entries ...
            torch.testing.assert_close(t[kept], full[kept] / (1 - p), rtol=1e-6, atol=0)  # ... rescaled
            survived += int(kept.sum())
            entries += int((full != 0).sum())
        torch.testing.assert_close(lin[name], peft_task_arithmetic(pruned, weights, 0.8), rtol=2e-6, atol=2e-6)
        torch.testing.assert_close(ties[name], peft_ties(pruned, weights, 0.8), rtol=2e-6, atol=2e-6)
    assert abs(1 - survived / entries - p) < 0.1  # about p of the kept entries were dropped


@pytest.mark.parametrize("keep_dense", [False, True])
def test_dare_drop_fraction_and_rescale(keep_dense):
    g = torch.Generator().manual_seed(5)
    tau = torch.randn(400_000, generator=g)
    if keep_dense:
        tau[torch.rand(400_000, generator=g) < 0.5] = 0.0
        expert = compeft.compress({"w": tau}, keep_dense=["w"])
    else:
        expert = compeft.compress({"w": tau}, density=0.5)
    full = expert.to_dense("w").float()
    kept = full != 0
    assert abs(int(kept.sum()) - 200_000) < 2_000
    p, w = 0.3, 0.75
    for method in ("dare_linear", "dare_ties"):
        got = compeft.merge([expert], method=method, weights=[w], drop_rate=p, seed=3)["w"]
        survivors = got != 0
        assert not bool((survivors & ~kept).any())  # nothing appears where nothing was kept
        dropped = 1 - int(survivors.sum()) / int(kept.sum())
        assert abs(dropped - p) < 0.01, dropped
        want = (w * full.double()[survivors] / (1 - p)).float()
        torch.testing.assert_close(got[survivors], want, rtol=1e-6, atol=0)
    # unbiased: E[Σ merged] = w·Σ τ̃, within 5 standard deviations (Var = Σ (w·τ̃)² · p / (1 − p))
    total = compeft.merge([expert], method="dare_linear", weights=[w], drop_rate=p, seed=9)["w"].double().sum()
    std = math.sqrt(float(((w * full.double()) ** 2).sum()) * p / (1 - p))
    assert abs(float(total) - w * float(full.double().sum())) < 5 * std


def test_dare_drops_independent_across_experts_and_tensors():
    g = torch.Generator().manual_seed(6)
    tau = torch.randn(100_000, generator=g)
    expert = compeft.compress({"a": tau, "b": tau.clone()}, density=0.5)
    p = 0.3
    got = compeft.merge([expert, expert], method="dare_linear", drop_rate=p, seed=1)
    v = expert.to_dense("a").abs().max().item()
    for name in ("a", "b"):
        kept = expert.to_dense(name) != 0
        both = got[name][kept].abs()
        one = torch.isclose(both, torch.tensor(v / (1 - p)), rtol=1e-5).double().mean().item()
        assert abs(one - 2 * p * (1 - p)) < 0.015, one  # identical masks would give 0 here
    # the same content in two tensors of one expert is dropped differently
    assert not torch.equal(got["a"] != 0, got["b"] != 0)


def test_dare_metadata():
    experts = make_experts(2, SHAPES)
    result = compeft.merge(experts, method="dare_ties", weights=[0.5, 2.0], lam=1.5, drop_rate=0.25, seed=42)
    md = result.metadata
    assert md["method"] == "dare_ties"
    assert md["weights"] == [0.5, 2.0]  # DARE does not normalise
    assert md["lambda"] == 1.5
    assert md["drop_rate"] == 0.25
    assert md["seed"] == 42
    assert len(md["experts"]) == 2
    soup = compeft.merge(experts, method="linear", weights=[1.0, 3.0])
    assert soup.metadata["method"] == "linear" and soup.metadata["weights"] == [0.25, 0.75]
    assert soup.metadata["drop_rate"] == 0.0


@pytest.mark.parametrize("method,drop_rate", [("ties", 0.1), ("linear", 0.5), ("task_arithmetic", 0.01),
                                              ("dare_linear", 1.0), ("dare_ties", -0.1), ("dare_linear", 1.5),
                                              ("dare_ties", float("nan"))])
def test_dare_bad_drop_rate(method, drop_rate):
    experts = make_experts(2, SHAPES)
    with pytest.raises(InvalidArgumentError):
        compeft.merge(experts, method=method, drop_rate=drop_rate)


# ---------------------------------------------------------------------------------------------
# 4. determinism across thread counts


def test_thread_count_does_not_change_results(same):
    shapes = {"big": (300, 400), "small": (1000,), "dense": (64, 8)}
    experts = make_experts(4, shapes, densities=[0.2, 0.5, 0.8, 0.35], keep_dense=["dense"], chunk_size=97)
    assert experts[0].entry("big").nnz > 20 * 97  # many chunks: the work really is spread over threads
    weights = [0.3, -1.1, 2.0, 0.7]
    before = numba.get_num_threads()
    try:
        runs = []
        for threads in (1, numba.config.NUMBA_NUM_THREADS):
            numba.set_num_threads(threads)
            runs.append({m: compeft.merge(experts, method=m, weights=weights, lam=0.9,
                                          drop_rate=0.3 if METHODS[m].dare else 0.0, seed=5)
                         for m in METHODS})
    finally:
        numba.set_num_threads(before)
    for m in METHODS:
        for name in shapes:
            assert same(runs[0][m][name], runs[1][m][name]), (m, name)
            assert torch.equal(runs[0][m][name], runs[1][m][name])


# ---------------------------------------------------------------------------------------------
# 5. merging into a state dict


@pytest.mark.parametrize("weight_dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("method", sorted(METHODS))
def test_into_state_dict(weight_dtype, method, same):
    experts = make_experts(3, SHAPES, dtype=torch.bfloat16)
    kwargs = dict(method=method, weights=[0.5, 1.0, 1.5], lam=0.8, drop_rate=0.2 if METHODS[method].dare else 0.0,
                  seed=3)
    merged = compeft.merge(experts, **kwargs)
    g = torch.Generator().manual_seed(1)
    state = {n: torch.randn(s, generator=g).to(weight_dtype) for n, s in SHAPES.items()}
    want = {n: (w.float() + merged[n]).to(weight_dtype) for n, w in state.items()}
    ids = {n: state[n].data_ptr() for n in state}
    result = compeft.merge(experts, into=state, **kwargs)
    assert isinstance(result, MergeResult) and len(result) == 0
    assert result.metadata["method"] == method and result.metadata["lambda"] == 0.8
    for n in state:
        assert state[n].dtype == weight_dtype
        assert state[n].data_ptr() == ids[n]  # in place
        assert same(state[n], want[n]), n


def test_into_missing_names_changes_nothing(same):
    experts = make_experts(2, SHAPES)
    state = {n: torch.randn(s) for n, s in SHAPES.items() if n != "layer.1.weight"}
    state["unrelated"] = torch.randn(3)
    before = {n: t.clone() for n, t in state.items()}
    with pytest.raises(BaseMismatchError):
        compeft.merge(experts, into=state)
    for n in state:
        assert same(state[n], before[n])


def test_into_shape_mismatch_broadcast_raises():
    experts = make_experts(2, {"w": (4,)})
    state = {"w": torch.zeros(3, 4)}
    with pytest.raises(BaseMismatchError):
        compeft.merge(experts, into=state)


def test_into_shape_mismatch_changes_nothing(same):
    experts = make_experts(2, {"a": (3, 4), "b": (5,)})
    state = {"a": torch.zeros(3, 4), "b": torch.zeros(6)}
    before = {n: t.clone() for n, t in state.items()}
    with pytest.raises(BaseMismatchError):
        compeft.merge(experts, into=state)
    assert all(same(state[n], before[n]) for n in state)


def test_into_integer_weight_raises():
    experts = make_experts(2, {"w": (8,)})
    state = {"w": torch.zeros(8, dtype=torch.int64)}
    with pytest.raises(BaseMismatchError):
        compeft.merge(experts, into=state)
    assert torch.equal(state["w"], torch.zeros(8, dtype=torch.int64))


# ---------------------------------------------------------------------------------------------
# 6. errors and inputs


def test_different_names_or_shapes():
    a = compeft.compress({"w": torch.randn(4, 4), "b": torch.randn(4)})
    with pytest.raises(BaseMismatchError):
        compeft.merge([a, compeft.compress({"w": torch.randn(4, 4)})])
    with pytest.raises(BaseMismatchError):
        compeft.merge([a, compeft.compress({"w": torch.randn(4, 4), "c": torch.randn(4)})])
    with pytest.raises(BaseMismatchError):
        compeft.merge([a, compeft.compress({"w": torch.randn(4, 4), "b": torch.randn(5)})])
    with pytest.raises(BaseMismatchError):
        compeft.merge([a, a, compeft.compress({"w": torch.randn(2, 8), "b": torch.randn(4)})])  # same numel


def save_model(directory: Path, tensors: dict[str, torch.Tensor]) -> Path:
    directory.mkdir(parents=True)
    save_file({n: t.contiguous() for n, t in tensors.items()}, str(directory / "model.safetensors"))
    return directory


def test_base_fingerprints(tmp_path):
    g = torch.Generator().manual_seed(0)
    shapes = {"w": (8, 6), "b": (6,)}
    base1 = {n: torch.randn(s, generator=g) for n, s in shapes.items()}
    base2 = {n: t + 0.01 for n, t in base1.items()}
    ft1 = {n: t + 0.1 * torch.randn(t.shape, generator=g) for n, t in base1.items()}
    ft2 = {n: t + 0.1 * torch.randn(t.shape, generator=g) for n, t in base1.items()}
    d_base1, d_base2 = save_model(tmp_path / "base1", base1), save_model(tmp_path / "base2", base2)
    d_ft1, d_ft2 = save_model(tmp_path / "ft1", ft1), save_model(tmp_path / "ft2", ft2)
    e1 = compeft.compress(d_ft1, base=d_base1, density=0.5)
    e2 = compeft.compress(d_ft2, base=d_base1, density=0.5)
    e3 = compeft.compress(d_ft2, base=d_base2, density=0.5)
    assert e1.metadata["base_fingerprint"] == e2.metadata["base_fingerprint"] != e3.metadata["base_fingerprint"]
    ok = compeft.merge([e1, e2], method="ties")
    assert_matches_peft([e1, e2], ok, "ties", [1.0, 1.0], 1.0)
    with pytest.raises(BaseMismatchError):
        compeft.merge([e1, e3])
    with pytest.raises(BaseMismatchError):
        compeft.merge([e1, e2, e3], method="ties")
    forced = compeft.merge([e1, e3], check_base=False)
    assert_matches_peft([e1, e3], forced, "task_arithmetic", [1.0, 1.0], 1.0)
    # an expert without a fingerprint (a tensor mapping) does not match one with a fingerprint
    plain = compeft.compress({"b": torch.randn(6), "w": torch.randn(8, 6)})
    with pytest.raises(BaseMismatchError):
        compeft.merge([e1, plain])
    compeft.merge([e1, plain], check_base=False)


def test_value_tensor_rejected():
    experts = [compeft.compress({"w": torch.randn(4, 4), "steps": torch.arange(3)}) for _ in range(2)]
    assert experts[0].entry("steps").role == "value"
    for method in METHODS:
        with pytest.raises(InvalidArgumentError):
            compeft.merge(experts, method=method)


@pytest.mark.parametrize("kwargs", [dict(method="foo"), dict(method="TIES"), dict(weights=[1.0]),
                                    dict(weights=[1.0, 2.0, 3.0]), dict(weights=[float("nan"), 1.0]),
                                    dict(weights=[1.0, float("inf")]), dict(weights=[]), dict(lam=float("nan")),
                                    dict(lam=float("inf")), dict(method="linear", weights=[1.0, -1.0])])
def test_bad_arguments(kwargs):
    experts = make_experts(2, SHAPES)
    with pytest.raises(InvalidArgumentError):
        compeft.merge(experts, **kwargs)


def test_linear_zero_sum_allowed_without_normalisation():
    experts = make_experts(2, SHAPES)
    result = compeft.merge(experts, method="linear", weights=[1.0, -1.0], normalize=False)
    assert_matches_peft(experts, result, "task_arithmetic", [1.0, -1.0], 1.0)


@pytest.mark.parametrize("weights", [["x", 1.0], [None, 1.0]])
def test_non_numeric_weights(weights):
    experts = make_experts(2, SHAPES)
    with pytest.raises(CompeftError):
        compeft.merge(experts, weights=weights)


def test_empty_expert_list():
    with pytest.raises(InvalidArgumentError):
        compeft.merge([])
    with pytest.raises(InvalidArgumentError):
        compeft.merge([], method="ties")


def test_experts_as_paths(tmp_path, same):
    experts = make_experts(3, SHAPES)
    paths = []
    for i, e in enumerate(experts):
        paths.append(tmp_path / f"e{i}.cpeft")
        e.save(paths[-1])
    mixed = [str(paths[0]), paths[1], experts[2]]
    for method in ("ties", "dare_linear"):
        kwargs = dict(method=method, weights=[1.0, 0.5, 2.0], drop_rate=0.2 if method == "dare_linear" else 0.0)
        want = compeft.merge(experts, **kwargs)
        for given_ in (paths, mixed, [compeft.open(p) for p in paths]):
            got = compeft.merge(given_, **kwargs)
            for name in experts[0].names:
                assert same(got[name], want[name])
            assert got.metadata["experts"][0] == str(paths[0])
    with pytest.raises(CompeftError):
        compeft.merge([paths[0], tmp_path / "missing.cpeft"])


def test_merge_corrupt_expert_changes_nothing(tmp_path, container, same):
    experts = make_experts(2, SHAPES)
    path = tmp_path / "bad.cpeft"
    experts[1].save(path)
    start, end = container.read(path).payload_range("layer.1.weight")
    container.flip_byte(path, (start + end) // 2)
    state = {n: torch.randn(s) for n, s in SHAPES.items()}
    before = {n: t.clone() for n, t in state.items()}
    with pytest.raises(CompeftError):
        compeft.merge([experts[0], path], into=state)
    assert all(same(state[n], before[n]) for n in state)


# ---------------------------------------------------------------------------------------------
# 7. dense-kept delta tensors


@pytest.mark.parametrize("dtype", DTYPES)
def test_keep_dense_delta_merges_like_compressed(dtype):
    experts = make_experts(4, SHAPES, dtype=dtype, keep_dense=["layer.0.*"], densities=[0.2, 0.4, 0.6, 0.8])
    assert experts[0].entry("layer.0.weight").role == "delta"
    assert experts[0].entry("layer.0.weight").encoding != experts[0].entry("layer.1.weight").encoding
    weights = [0.5, -1.0, 1.5, 2.0]
    for method in ("ties", "task_arithmetic", "linear"):
        result = compeft.merge(experts, method=method, weights=weights, lam=0.6)
        assert_matches_peft(experts, result, method, weights, 0.6)
    # a float64 delta is kept dense too, and merges in float32
    e64 = [compeft.compress({"w": torch.randn(5, 3, dtype=torch.float64)}) for _ in range(3)]
    assert_matches_peft(e64, compeft.merge(e64, method="ties"), "ties", [1.0] * 3, 1.0)


def test_empty_and_all_zero_tensors():
    experts = [compeft.compress({"empty": torch.zeros(0, 3), "zero": torch.zeros(6), "w": torch.randn(7)},
                                density=0.5, scope="tensor") for _ in range(3)]
    for method in METHODS:
        result = compeft.merge(experts, method=method, drop_rate=0.5 if METHODS[method].dare else 0.0)
        assert result["empty"].shape == (0, 3)
        assert torch.equal(result["zero"], torch.zeros(6))


# ---------------------------------------------------------------------------------------------
# 8. one pass over the streams, no dense copy per expert


def test_no_dense_copy_of_experts(monkeypatch):
    g = torch.Generator().manual_seed(8)
    experts = [compeft.compress({"w": torch.randn(1000, 1000, generator=g), "b": torch.randn(100, generator=g)},
                                density=0.05, keep_dense=["b"]) for _ in range(8)]
    weights = [0.1 * (i + 1) for i in range(8)]
    want = {m: peft_reference(m, dense(experts, "w"), weights, 1.0) for m in ("ties", "task_arithmetic")}

    def forbidden(*args, **kwargs):
        raise AssertionError("merge decoded an expert densely")

    monkeypatch.setattr(CompressedExpert, "state_dict", forbidden)
    monkeypatch.setattr(CompressedExpert, "to_dense", forbidden)
    big = []
    real_zeros, real_empty = torch.zeros, torch.empty

    def counting(factory):
        def make(*args, **kwargs):
            t = factory(*args, **kwargs)
            if t.numel() >= 1_000_000:
                big.append(t.numel())
            return t
        return make

    monkeypatch.setattr(torch, "zeros", counting(real_zeros))
    monkeypatch.setattr(torch, "empty", counting(real_empty))
    for method, accumulators in (("task_arithmetic", 1), ("ties", 3), ("dare_ties", 3), ("linear", 1)):
        big.clear()
        result = compeft.merge(experts, method=method, weights=weights,
                               drop_rate=0.1 if METHODS[method].dare else 0.0)
        assert len(big) <= accumulators, (method, big)  # a fixed number of accumulators, not one per expert
        if method in want:
            torch.testing.assert_close(result["w"], want[method], rtol=2e-6, atol=2e-6)


# ---------------------------------------------------------------------------------------------
# names=: merging a subset (one shard at a time) gives the full merge's tensors


def test_names_subset_matches_full_merge(same):
    experts = make_experts(3, SHAPES, keep_dense=["layer.0.bias"])
    subset = ["layer.1.weight", "layer.0.bias"]
    for method in METHODS:
        kwargs = dict(method=method, weights=[0.5, 1.0, 2.0], drop_rate=0.3 if METHODS[method].dare else 0.0, seed=4)
        full = compeft.merge(experts, **kwargs)
        part = compeft.merge(experts, names=subset, **kwargs)
        assert sorted(part) == sorted(subset)
        for name in subset:
            assert same(part[name], full[name]), (method, name)  # DARE drops depend on the tensor, not the subset
        state = {n: torch.zeros(SHAPES[n]) for n in subset}  # into= needs only the selected tensors
        compeft.merge(experts, names=subset, into=state, **kwargs)
        for name in subset:
            assert same(state[name], full[name]), (method, name)
    with pytest.raises(InvalidArgumentError):
        compeft.merge(experts, names=["layer.0.weight", "nope"])


def test_names_duplicates_counted_once(same):
    experts = make_experts(2, {"w": (64,)}, densities=[1.0, 1.0])
    full = compeft.merge(experts)
    state = {"w": torch.zeros(64)}
    try:
        dup = compeft.merge(experts, names=["w", "w"])
    except InvalidArgumentError:
        return  # rejecting duplicates is fine too
    compeft.merge(experts, names=["w", "w"], into=state)
    assert same(dup["w"], full["w"])
    assert same(state["w"], full["w"])


# ---------------------------------------------------------------------------------------------
# mergekit configs (compeft merge --config); the proof against mergekit itself is
# tests/test_mergekit.py. Here: validation, dry runs, the tie rule's pieces, union, PEFT's rule.

from compeft import merge_trim  # noqa: E402
from compeft.cli import main as cli_main  # noqa: E402
from compeft.merge_config import load_config  # noqa: E402
from compeft.merge_methods import Operands, gta_dense, gta_stream  # noqa: E402
from compeft.merge_run import merge_from_config, plan_config  # noqa: E402


@pytest.fixture
def saved(tmp_path):
    """Three experts on disk (tensor scope: each tensor its own magnitude) and a base directory."""
    experts = make_experts(3, SHAPES, densities=[0.3, 0.4, 0.5], scope="tensor", keep_dense=["layer.0.bias"])
    paths = []
    for i, e in enumerate(experts):
        paths.append(str(tmp_path / f"e{i}.cpeft"))
        e.save(paths[-1])
    base = save_model(tmp_path / "base", {n: torch.randn(s) for n, s in SHAPES.items()})
    return tmp_path, paths, base


def config(paths, method="ties", weights=(1.0, 0.5, 0.7), base=None, **params):
    out = {"merge_method": method, "models": [{"model": p, "parameters": {"weight": w}} for p, w in zip(paths, weights)]}
    if base is not None:
        out["base_model"] = str(base)
    if params:
        out["parameters"] = params
    return out


@pytest.fixture
def no_payloads(monkeypatch):
    """Fail any read of a payload: what runs under it works from headers alone."""
    def refuse(self, *args, **kwargs):
        raise AssertionError("a payload was read")
    monkeypatch.setattr(CompressedExpert, "payloads", refuse)


BAD_CONFIGS = [
    (lambda c: c.update(foo=1), "unknown config key 'foo'"),
    (lambda c: c.update(slices=[]), "'slices'"),
    (lambda c: c.update(merge_method="slerp"), "'slerp' is not supported"),
    (lambda c: c.pop("merge_method"), "merge_method"),
    (lambda c: c.pop("base_model"), "needs base_model"),
    (lambda c: [m.pop("parameters") for m in c["models"]], "parameter 'weight'"),
    (lambda c: c.update(parameters={"density": 1.5}), "'density'"),
    (lambda c: c.update(parameters={"density": -0.1}), "'density'"),
    (lambda c: c.update(parameters={"lambda": "abc"}), "expected a finite number"),
    (lambda c: c.update(parameters={"lambda": float("nan")}), "expected a finite number"),
    (lambda c: c.update(parameters={"normalize": "maybe"}), "expected true or false"),
    (lambda c: c.update(parameters={"gamma": 0.1}), "not a parameter of ties"),
    (lambda c: c.update(parameters={"density": [{"filter": "layer"}]}), "value missing"),
    (lambda c: c.update(parameters={"density": [0.5, {"filter": "a", "value": 1}]}), "expected a finite number"),
    (lambda c: c.update(parameters={"density": {"value": [[0.5]]}}), "scalar or a list"),
    (lambda c: c.update(parameters={"density": []}), "empty list"),
    (lambda c: c["models"][0].update(lora="x"), "unknown key 'lora'"),
    (lambda c: c["models"][0].update(model=c["models"][0]["model"] + "+lora"), "MODEL+LORA"),
    (lambda c: c["models"].append(dict(c["models"][0])), "listed twice"),
    (lambda c: c.update(dtype="int8"), "'dtype'"),
    (lambda c: c.update(out_dtype=16), "'out_dtype'"),
    (lambda c: c.update(tokenizer_source="union"), "tokenizer_source"),
    (lambda c: c.update(chat_template="chatml"), "chat_template"),
    (lambda c: c.update(models=[]), "'models'"),
    (lambda c: c.update(merge_method="nuslerp", parameters={}), "at most 2"),
    (lambda c: c.update(merge_method="model_stock", parameters={}, models=[{"model": c["models"][0]["model"]}]),
     "at least 2"),
    (lambda c: c.update(merge_method="della", parameters={"density": 0.1, "epsilon": 0.15}), "density ± epsilon"),
    (lambda c: c.update(merge_method="linear", parameters={}), "mergekit adds base_model"),
    (lambda c: c.update(merge_method="passthrough", parameters={}, models=[{"model": c["models"][0]["model"]}]),
     "exactly one model"),
    (lambda c: c["models"][1].update(parameters={"weight": [{"filter": "layer.1", "value": 1.0}]}), "'weight'"),
]


@pytest.mark.parametrize("mutate, fragment", BAD_CONFIGS)
def test_config_validation_refuses_before_any_payload(saved, no_payloads, mutate, fragment):
    root, paths, base = saved
    conf = config(paths, base=base, density=0.5)
    mutate(conf)
    with pytest.raises(InvalidArgumentError, match=re.escape(fragment)):
        merge_from_config(conf, root / "out")


def test_config_yaml_is_read_safely(saved):
    root, paths, base = saved
    (root / "evil.yml").write_text("merge_method: !!python/object/apply:os.system ['echo owned']\nmodels: []\n")
    with pytest.raises(InvalidArgumentError, match="not valid YAML"):
        load_config(root / "evil.yml")
    (root / "list.yml").write_text("- a\n- b\n")
    with pytest.raises(InvalidArgumentError, match="must be a mapping"):
        load_config(root / "list.yml")


def test_cli_config_errors_are_one_line(saved, capsys):
    root, paths, base = saved
    yml = root / "m.yml"
    yml.write_text(yaml.safe_dump(config(paths, base=base, density=2)))
    assert cli_main(["merge", "--config", str(yml), "-o", str(root / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("compeft: error:") and "'density'" in err and "\n" not in err
    for extra in (["--method", "ties"], ["--weights", "1,2,3"], ["--drop-rate", "0.1"], [paths[0]]):
        assert cli_main(["merge", "--config", str(yml), "-o", str(root / "out"), *extra]) == 2
        assert "cannot be combined with --config" in capsys.readouterr().err
    assert cli_main(["merge", paths[0], paths[1], "--dry-run"]) == 2
    assert "--dry-run needs --config" in capsys.readouterr().err


def test_dry_run_reads_headers_only(saved, no_payloads, capsys):
    root, paths, base = saved
    yml = root / "m.yml"
    yml.write_text(yaml.safe_dump(config(paths, base=base, density=0.5)))
    assert cli_main(["merge", "--config", str(yml), "--dry-run", "-o", str(root / "out")]) == 0
    out = capsys.readouterr().out
    assert out.startswith("config OK: ties of 3 experts") and "base holds every tensor" in out
    assert not (root / "out").exists()
    plan = merge_from_config(config(paths, base=base, density=0.5), dry_run=True)
    assert plan.summary()["tensors"] == len(SHAPES)


def test_dry_run_catches_incompatible_experts_and_base(saved, no_payloads, tmp_path):
    root, paths, base = saved
    other = tmp_path / "other.cpeft"
    compeft.compress({n: torch.randn(2, 2) if n == "layer.0.weight" else torch.randn(s) for n, s in SHAPES.items()},
                     density=0.5).save(other)
    with pytest.raises(BaseMismatchError, match="shape"):
        merge_from_config(config([paths[0], str(other)], weights=(1, 1), base=base), dry_run=True)
    small = save_model(tmp_path / "small", {"layer.0.weight": torch.zeros(24, 16)})
    with pytest.raises(BaseMismatchError, match="not in the base"):
        merge_from_config(config(paths, base=small), root / "model-out", dry_run=True)
    with pytest.raises(InvalidArgumentError, match="needs the base"):
        merge_from_config(config(paths, method="linear"), root / "model-out", dry_run=True)


def test_peft_ties_config_is_compeft_ties(saved, same):
    root, paths, base = saved
    got = merge_from_config(config(paths, method="peft_ties", base=base, **{"lambda": 0.8}))
    want = compeft.merge([compeft.open(p) for p in paths], method="ties", weights=[1.0, 0.5, 0.7], lam=0.8)
    for name in want:
        assert same(got[name], want[name]), name


def mergekit_gta(deltas, weights, consensus, normalize):
    """mergekit's generalised task arithmetic after sparsification, written out in torch."""
    w = torch.tensor(weights).reshape(-1, *([1] * deltas[0].dim()))
    d = torch.stack(deltas) * w
    if consensus:
        mask = d.sign() == ((d.sum(0) >= 0).float() * 2 - 1)
        mixed, divisor = (d * mask).sum(0), (w * mask).sum(0)
        divisor[divisor == 0] = 1
    else:
        mixed, divisor = d.sum(0), w.sum()
    return mixed / divisor if normalize else mixed


def test_dense_stored_delta_is_trimmed_by_magnitude(saved):
    """A tensor stored dense has many magnitudes: TIES keeps its top k, as mergekit."""
    root, paths, base = saved
    got = merge_from_config(config(paths, base=base, density=0.3))
    name = "layer.0.bias"
    deltas = []
    for p in paths:
        t = compeft.open(p).to_dense(name).float()
        k = max(1, int(0.3 * t.numel()))
        keep = torch.zeros(t.numel(), dtype=torch.bool)
        keep[t.abs().argsort(descending=True)[:k]] = True
        deltas.append(torch.where(keep, t, torch.zeros_like(t)))
    torch.testing.assert_close(got[name], mergekit_gta(deltas, [1.0, 0.5, 0.7], True, True))


@pytest.mark.parametrize("method, params", [
    ("ties", {"density": 0.2}), ("ties", {"density": 0.15, "rescale": True}), ("breadcrumbs", {"density": 0.3}),
    ("breadcrumbs_ties", {"density": 0.2, "gamma": 0.05}), ("dare_ties", {"density": 0.6}),
    ("dare_linear", {"density": 0.4, "normalize": True}), ("peft_ties", {"density": 0.2}),
    ("task_arithmetic", {}),
])
def test_stream_and_decoded_paths_agree(saved, same, method, params):
    """The kernels' drop cuts and the decoded path's trims are the same rule, bit for bit."""
    root, paths, base = saved
    for weights in ((1.0, -0.5, 0.7), (1.0, 0.5, 0.7), (0.5, 0.5, 0.5)):  # exact, stepped, single divisors
        plan = plan_config(config(paths, method=method, weights=weights, base=base, **params), seed=3)
        names = [n for n in plan.names if n != "layer.0.bias"]  # compressed in every expert
        ops = Operands(plan.operands, plan.indices, names, plan.seed)
        stream = gta_stream(plan.config.method, ops, names, plan.params)
        for name in names:
            assert same(stream[name], gta_dense(plan.config.method, ops, name, plan.params[name])), (weights, name)


def test_tie_rule_hashes_are_the_kernels_drops():
    expert = compeft.compress({"w": torch.randn(5000)}, density=0.4)
    nnz = expert.entry("w").nnz
    key, cut = 12345, int(0.3 * 2 ** 63)
    out = torch.zeros(5000)
    expert.executor(None, ["w"]).run([compeft.plan.TensorPlan("w", compeft.plan.ACCUMULATE, out, 1.0, None, key, cut)])
    where = torch.nonzero(expert.to_dense("w").float()).reshape(-1)
    kept = merge_trim.entry_hashes(key, 0, nnz) >= np.uint64(cut)
    assert torch.equal(out[where] != 0, torch.from_numpy(kept))
    assert merge_trim.count_kept(key, cut, nnz) == int(kept.sum())


def test_top_cut_in_blocks_is_exact(monkeypatch):
    nnz = 7000
    h = merge_trim.entry_hashes(99, 0, nnz)
    wanted = {c: int(np.sort(h)[::-1][c - 1]) for c in (1, 17, 3500, 6999)}
    monkeypatch.setattr(merge_trim, "BLOCK", 1000)  # the histogram path
    for c, cut in wanted.items():
        assert merge_trim.top_cut(99, nnz, c) == cut
        assert merge_trim.count_kept(99, cut, nnz) == c


def test_config_merges_bit_identical_across_thread_counts(saved, same):
    root, paths, base = saved
    confs = [config(paths, method="della", base=base, density=0.5, epsilon=0.2),
             config(paths, method="breadcrumbs_ties", base=base, density=0.2),
             {"merge_method": "model_stock", "base_model": str(base), "models": [{"model": p} for p in paths]},
             {"merge_method": "sce", "base_model": str(base), "models": [{"model": p} for p in paths],
              "parameters": {"select_topk": 0.5}},
             config(paths[:2], method="nuslerp", weights=(1, 2), base=base)]
    threads, numba_threads = torch.get_num_threads(), numba.get_num_threads()
    try:
        results = []
        for n in (1, max(2, numba.config.NUMBA_NUM_THREADS)):
            torch.set_num_threads(n)
            numba.set_num_threads(min(n, numba.config.NUMBA_NUM_THREADS))
            results.append([merge_from_config(c, seed=1) for c in confs])
    finally:
        torch.set_num_threads(threads)
        numba.set_num_threads(numba_threads)
    for a, b in zip(*results):
        assert all(same(a[n], b[n]) for n in a)


def test_union_counts_a_missing_tensor_as_zero(same):
    g = torch.Generator().manual_seed(0)
    a = {"x": torch.randn(50, generator=g), "y": torch.randn(30, generator=g)}
    b = {"y": torch.randn(30, generator=g), "z": torch.randn(20, generator=g)}
    experts = [compeft.compress(t, density=0.5) for t in (a, b)]
    padded = [compeft.compress({**t, **{n: torch.zeros(s) for n, s in (("x", 50), ("y", 30), ("z", 20)) if n not in t}},
                               density=0.5) for t in (a, b)]
    with pytest.raises(BaseMismatchError, match="union"):
        compeft.merge(experts)
    for method, kwargs in (("task_arithmetic", {}), ("ties", {}), ("dare_linear", {"drop_rate": 0.3, "seed": 2})):
        got = compeft.merge(experts, method=method, weights=[1.0, 0.5], union=True, **kwargs)
        want = compeft.merge(padded, method=method, weights=[1.0, 0.5], **kwargs)
        assert list(got) == ["x", "y", "z"] and got.metadata["union"] is True
        for n in want:
            assert torch.allclose(got[n], want[n], atol=1e-6), (method, n)  # magnitudes differ by the padding's σ
    state = {"x": torch.zeros(50), "y": torch.zeros(30), "z": torch.zeros(20)}
    compeft.merge(experts, union=True, into=state)
    assert same(state["z"], compeft.merge(experts, union=True)["z"])


def test_config_models_by_library_name(saved, monkeypatch, same):
    """``library:`` (or --library): a model found in the catalog comes from it, else from its path."""
    root, paths, base = saved
    opened = {}

    class FakeLibrary(dict):
        pass

    def fake_open_library(url, **kwargs):
        opened["url"] = url
        return FakeLibrary(math=compeft.open(paths[0]), code=compeft.open(paths[1]))

    monkeypatch.setattr("compeft.library.open_library", fake_open_library)
    conf = config(["math", "code", paths[2]], base=base, density=0.5)
    got = merge_from_config({**conf, "library": "s3://bucket/lib"})
    want = merge_from_config(config(paths, base=base, density=0.5))
    assert opened["url"] == "s3://bucket/lib" and all(same(got[n], want[n]) for n in want)
    with pytest.raises(InvalidArgumentError, match="library"):
        merge_from_config({**conf, "library": "s3://bucket/lib"}, library="s3://other")
    yml = root / "lib.yml"
    yml.write_text(yaml.safe_dump(conf))
    assert cli_main(["merge", "--config", str(yml), "--library", "s3://bucket/x", "-o", str(root / "tv.safetensors"),
                     "-q"]) == 0
    from safetensors.torch import load_file
    tv = load_file(str(root / "tv.safetensors"))
    assert all(same(tv[n], want[n]) for n in want)
    record = json.loads(compeft.open(paths[0]).metadata.get("user", {}).get("merge", "{}") or "{}")
    assert record == {}  # the inputs are untouched


def test_config_outputs_model_tv_and_cpeft(saved, same):
    root, paths, base = saved
    conf = config(paths, base=base, density=0.5, **{"lambda": 0.5})
    tv = merge_from_config(conf)
    out = merge_from_config(conf, root / "model")
    from safetensors.torch import load_file
    merged, base_sd = load_file(str(out / "model.safetensors")), load_file(str(base / "model.safetensors"))
    for n in tv:
        assert same(merged[n], base_sd[n] + tv[n])
    path = merge_from_config(conf, root / "m.cpeft", density=0.2)
    expert = compeft.open(path)
    assert expert.metadata["density"] == 0.2
    assert json.loads(expert.metadata["user"]["merge"])["method"] == "ties"
    with pytest.raises(InvalidArgumentError, match="scales the base"):
        merge_from_config({**config(paths, method="linear", normalize=False)}, root / "x.safetensors", base=base)


# ---------------------------------------------------------------------------------------------
# tensors stored as values (an integer buffer such as position_ids, which a full fine-tune keeps)


def experts_with_a_buffer(ids: list[torch.Tensor]) -> list[CompressedExpert]:
    g = torch.Generator().manual_seed(7)
    return [compeft.compress({"w": torch.randn(64, 32, generator=g), "ids": i}, density=0.3) for i in ids]


def test_merge_onto_weights_copies_the_value_every_expert_stores():
    experts = experts_with_a_buffer([torch.arange(16), torch.arange(16)])
    assert [e.entry("ids").role for e in experts] == ["value", "value"]
    base = {"w": torch.randn(64, 32), "ids": torch.zeros(16, dtype=torch.int64)}
    into = {n: t.clone() for n, t in base.items()}
    compeft.merge(experts, method="ties", into=into)
    assert torch.equal(into["ids"], torch.arange(16))
    tau = compeft.merge(experts, method="ties", names=["w"])["w"]
    assert torch.equal(into["w"], base["w"] + tau)


def test_merge_without_weights_refuses_a_value_and_says_what_to_do():
    experts = experts_with_a_buffer([torch.arange(16), torch.arange(16)])
    with pytest.raises(InvalidArgumentError, match=r"'ids' is stored as a value.*onto a base.*names="):
        compeft.merge(experts)
    assert set(compeft.merge(experts, names=["w"])) == {"w"}


def test_experts_storing_different_values_do_not_merge_and_leave_the_weights_alone():
    experts = experts_with_a_buffer([torch.arange(16), torch.arange(16).flip(0)])
    into = {"w": torch.randn(64, 32), "ids": torch.zeros(16, dtype=torch.int64)}
    before = {n: t.clone() for n, t in into.items()}
    with pytest.raises(InvalidArgumentError, match=r"'ids'.*different values"):
        compeft.merge(experts, into=into)
    assert all(torch.equal(into[n], before[n]) for n in into)


def test_a_value_in_one_expert_and_a_delta_in_another_do_not_merge():
    a = compeft.compress({"w": torch.randn(8, 8), "b": torch.arange(8)}, density=0.5)
    b = compeft.compress({"w": torch.randn(8, 8), "b": torch.randn(8)}, density=0.5)
    into = {"w": torch.zeros(8, 8), "b": torch.zeros(8)}
    with pytest.raises(InvalidArgumentError, match=r"'b' is stored as a value here and as a delta"):
        compeft.merge([a, b], into=into, check_base=False)


def full_finetunes(tmp_path: Path, seed: int) -> tuple[dict[str, torch.Tensor], list[str]]:
    """A base directory with an integer buffer (as BERT's position_ids) and two full fine-tunes of
    it, each compressed with `compeft compress FT --base BASE` and the default options."""
    from compeft.cli import main

    g = torch.Generator().manual_seed(seed)
    base = {"w": torch.randn(64, 32, generator=g), "position_ids": torch.arange(32).unsqueeze(0)}
    (tmp_path / "base").mkdir()
    save_file(base, tmp_path / "base" / "model.safetensors")
    paths = []
    for i in (1, 2):
        ft = {"w": base["w"] + 0.1 * torch.randn(64, 32, generator=g), "position_ids": base["position_ids"]}
        (tmp_path / f"ft{i}").mkdir()
        save_file(ft, tmp_path / f"ft{i}" / "model.safetensors")
        assert main(["compress", str(tmp_path / f"ft{i}"), "--base", str(tmp_path / "base"),
                     "-o", str(tmp_path / f"ft{i}.cpeft"), "-q"]) == 0
        paths.append(str(tmp_path / f"ft{i}.cpeft"))
    assert compeft.open(paths[0]).entry("position_ids").role == "value"
    return base, paths


def test_cli_merge_onto_a_base_directory_with_an_integer_buffer(tmp_path):
    """What failed on two real MiniLM fine-tunes (their embeddings.position_ids): `compeft merge
    A B --method ties --base BASE -o OUT` on full fine-tunes compressed with the defaults."""
    from safetensors.torch import load_file

    from compeft.cli import main

    base, paths = full_finetunes(tmp_path, 3)
    assert main(["merge", *paths, "--method", "ties", "--base", str(tmp_path / "base"),
                 "-o", str(tmp_path / "merged"), "-q"]) == 0
    merged = load_file(tmp_path / "merged" / "model.safetensors")
    assert torch.equal(merged["position_ids"], base["position_ids"])
    tau = compeft.merge([compeft.open(p) for p in paths], method="ties", names=["w"])["w"]
    assert torch.equal(merged["w"], base["w"] + tau)


def test_config_merge_onto_a_base_copies_agreed_values(tmp_path):
    from safetensors.torch import load_file

    from compeft.merge_run import merge_from_config

    base, paths = full_finetunes(tmp_path, 5)
    config = {"merge_method": "task_arithmetic", "base_model": str(tmp_path / "base"),
              "models": [{"model": p, "parameters": {"weight": 1.0}} for p in paths]}
    merge_from_config(config, output=tmp_path / "merged")
    merged = load_file(tmp_path / "merged" / "model.safetensors")
    assert torch.equal(merged["position_ids"], base["position_ids"])
    tau = compeft.merge([compeft.open(p) for p in paths], method="task_arithmetic", names=["w"])["w"]
    assert torch.allclose(merged["w"], base["w"] + tau, atol=1e-6)
    with pytest.raises(InvalidArgumentError, match="stored as a value"):  # a task vector holds deltas only
        merge_from_config({"merge_method": "linear", "models": config["models"]}, output=tmp_path / "tau.safetensors")
