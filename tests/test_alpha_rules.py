"""The data-free α rules (norm, unbiased, l2 and their LoRA product forms), the defaults, and the
fidelity figures and warnings they are judged by (FORMAT.md 7.3 and 7.6)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

import compeft
from compeft import alpha as rules
from compeft.errors import FidelityWarning, InvalidArgumentError
from compeft.report import describe

RULE_NAMES = ["l2", "norm", "unbiased"]


def masks_of(tau: dict[str, torch.Tensor], expert: compeft.CompressedExpert) -> dict[str, torch.Tensor]:
    return {n: expert.to_dense(n) != 0 for n in tau}


def naive_magnitude(rule: str, values: torch.Tensor, mask: torch.Tensor) -> float:
    """The rules of FORMAT.md 7.3 written the slow way, in float64."""
    v = values.double().reshape(-1)
    kept = v.abs()[mask.reshape(-1)]
    if rule == "l2":
        return float(kept.sum() / kept.numel())
    if rule == "norm":
        return float(v.norm() / math.sqrt(kept.numel()))
    return float((v * v).sum() / kept.sum())  # unbiased: <τ̃, τ> = ‖τ‖²


@pytest.mark.parametrize("rule", RULE_NAMES)
@pytest.mark.parametrize("density", [0.05, 0.1, 0.5])
def test_rules_tensor_scope_match_the_naive_formula(make_tv, rule, density):
    tau = make_tv(seed=5, shapes={"a": (40, 30), "b": (70,), "c": (9, 11)})
    expert = compeft.compress(tau, density=density, alpha=rule, scope="tensor")
    assert expert.metadata["alpha_rule"] == rule and expert.metadata["alpha"] is None
    masks = masks_of(tau, expert)
    for name in tau:
        want = float(np.float32(naive_magnitude(rule, tau[name], masks[name])))
        assert expert.entry(name).scale == pytest.approx(want, rel=1e-6)


@pytest.mark.parametrize("rule", RULE_NAMES)
def test_rules_global_scope_one_magnitude(make_tv, rule):
    tau = make_tv(seed=6, shapes={"a": (40, 30), "b": (70,)})
    expert = compeft.compress(tau, density=0.1, alpha=rule, scope="global")
    masks = masks_of(tau, expert)
    flat = torch.cat([tau[n].reshape(-1) for n in sorted(tau)])
    mask = torch.cat([masks[n].reshape(-1) for n in sorted(tau)])
    want = float(np.float32(naive_magnitude(rule, flat, mask)))
    assert expert.entry("a").scale == expert.entry("b").scale == pytest.approx(want, rel=1e-6)
    assert expert.metadata["alpha"] == pytest.approx(want / expert.metadata["sigma"], rel=1e-6)


def test_norm_rule_preserves_the_norm_and_unbiased_the_projection(make_tv):
    tau = {"w": make_tv(seed=7, shapes={"w": (200, 100)})["w"]}
    norm = compeft.compress(tau, alpha="norm").to_dense("w").double()
    assert float(norm.norm()) == pytest.approx(float(tau["w"].double().norm()), rel=1e-3)
    unbiased = compeft.compress(tau, alpha="unbiased").to_dense("w").double()
    t = tau["w"].double()
    assert float((unbiased * t).sum()) == pytest.approx(float((t * t).sum()), rel=1e-3)


@settings(max_examples=40, deadline=None)
@given(r=st.integers(1, 6), n=st.integers(1, 40), m=st.integers(1, 40), seed=st.integers(0, 2**31 - 1),
       ka=st.floats(0.05, 1.0), kb=st.floats(0.05, 1.0))
def test_product_statistics_equal_the_dense_products(r, n, m, seed, ka, kb):
    g = np.random.default_rng(seed)
    a = g.standard_normal((r, n)).astype(np.float32)
    b = g.standard_normal((m, r)).astype(np.float32)
    ta = float(np.quantile(np.abs(a), 1 - ka))
    tb = float(np.quantile(np.abs(b), 1 - kb))

    def stats(x: np.ndarray, t: float, factor: str) -> rules.TensorStats:
        kept = (np.abs(x) >= np.float32(t)) & (x != 0)
        sums = (float((x.astype(np.float64) ** 2).sum()), float(np.abs(x[kept]).astype(np.float64).sum()),
                int(kept.sum()))
        return rules.tensor_stats(x.reshape(-1), t, x.shape, factor, sums)

    sa, sb = stats(a, ta, "A"), stats(b, tb, "B")
    p = rules.product_stats(sa.gram, sb.gram)
    signs_a = np.sign(a) * ((np.abs(a) >= np.float32(ta)) & (a != 0))
    signs_b = np.sign(b) * ((np.abs(b) >= np.float32(tb)) & (b != 0))
    w = b.astype(np.float64) @ a.astype(np.float64)
    s = signs_b @ signs_a
    assert p.squares == pytest.approx(float((w * w).sum()), rel=1e-9, abs=1e-9)
    assert p.cross == pytest.approx(float((w * s).sum()), rel=1e-9, abs=1e-9)
    assert p.signs == pytest.approx(float((s * s).sum()), rel=1e-9, abs=1e-9)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), n=st.integers(0, 300), k=st.floats(0.0, 1.0))
def test_kept_signs_are_the_signs_of_the_kept_entries(seed, n, k):
    """select_kernels.kept_signs (the Gram matrices' operands, one pass) against numpy's
    ``sign(x) * kept``, signed zeros included."""
    from compeft.codec.select_kernels import kept_signs

    g = np.random.default_rng(seed)
    v = g.standard_normal(n).astype(np.float32)
    v[g.random(n) < 0.1] = 0.0
    v[g.random(n) < 0.1] = -0.0
    thr = np.float32(np.quantile(np.abs(v), 1 - k)) if n else np.float32(0.0)
    x, s = np.empty(n), np.empty(n)
    kept_signs(v, thr, x, s)
    want = np.sign(v.astype(np.float64)) * ((np.abs(v) >= thr) & (v != 0))
    assert np.array_equal(x, v.astype(np.float64))
    assert np.array_equal(s, want) and np.array_equal(np.signbit(s), np.signbit(want))


@pytest.fixture(scope="module")
def lora_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A LoRA adapter directory as PEFT saves it: A at random init scale, B small and trained-like
    (correlated with A), one embedding pair, one unpaired tensor, a dense head."""
    root = tmp_path_factory.mktemp("lora")
    g = torch.Generator().manual_seed(11)
    tensors = {}
    for layer in range(3):
        for proj, (out_f, in_f) in {"q_proj": (48, 32), "v_proj": (40, 32)}.items():
            prefix = f"base_model.model.layers.{layer}.{proj}"
            a = torch.randn(4, in_f, generator=g) / math.sqrt(in_f)
            tensors[f"{prefix}.lora_A.weight"] = a
            tensors[f"{prefix}.lora_B.weight"] = 1e-3 * torch.randn(out_f, 4, generator=g) @ (1 + torch.randn(4, 4, generator=g))
    tensors["base_model.model.embed.lora_embedding_A"] = torch.randn(4, 50, generator=g)
    tensors["base_model.model.embed.lora_embedding_B"] = 1e-3 * torch.randn(16, 4, generator=g)
    tensors["base_model.model.layers.0.extra.lora_A.weight"] = torch.randn(4, 32, generator=g)  # no B: unpaired
    tensors["base_model.model.score.modules_to_save.default.weight"] = torch.randn(2, 48, generator=g)
    save_file(tensors, str(root / "adapter_model.safetensors"))
    config = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"],
              "modules_to_save": ["score"], "task_type": "SEQ_CLS"}
    (root / "adapter_config.json").write_text(json.dumps(config))
    return root


def load_adapter_tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file
    return load_file(str(path / "adapter_model.safetensors"))


def module_products(expert: compeft.CompressedExpert, tensors: dict[str, torch.Tensor]):
    shapes = {n: tuple(t.shape) for n, t in tensors.items()}
    for a, b in rules.lora_pairs(expert.names, shapes):
        ta, tb = tensors[a].double(), tensors[b].double()
        da, db = expert.to_dense(a).double(), expert.to_dense(b).double()
        yield a, tb @ ta, db @ da


def test_lora_pairs_are_found_by_name_and_rank(lora_dir):
    tensors = load_adapter_tensors(lora_dir)
    pairs = rules.lora_pairs(sorted(tensors), {n: tuple(t.shape) for n, t in tensors.items()})
    assert len(pairs) == 7  # 3 layers × 2 projections + the embedding
    assert all(".lora_A" in a or ".lora_embedding_A" in a for a, _ in pairs)
    assert not any("extra" in a for a, _ in pairs)
    assert rules.lora_pairs(["m.lora_A.weight", "m.lora_B.weight"], {"m.lora_A.weight": (4, 8),
                                                                       "m.lora_B.weight": (8, 3)}) == []


def test_product_norm_preserves_each_modules_update_norm(lora_dir):
    tensors = load_adapter_tensors(lora_dir)
    expert = compeft.compress(lora_dir, density=0.1, alpha="product-norm")
    for name, original, restored in module_products(expert, tensors):
        assert float(restored.norm()) == pytest.approx(float(original.norm()), rel=2e-2), name  # bf16/f32 rounding


def test_product_l2_is_the_least_squares_product(lora_dir):
    tensors = load_adapter_tensors(lora_dir)
    expert = compeft.compress(lora_dir, density=0.2, alpha="product-l2")
    for name, original, restored in module_products(expert, tensors):
        best = float(((original - restored) ** 2).sum())
        for factor in (0.9, 1.1):
            assert best <= float(((original - factor * restored) ** 2).sum()), name


def test_product_unbiased_keeps_the_component_along_the_update(lora_dir):
    tensors = load_adapter_tensors(lora_dir)
    expert = compeft.compress(lora_dir, density=0.2, alpha="product-unbiased")
    for name, original, restored in module_products(expert, tensors):
        assert float((original * restored).sum()) == pytest.approx(float((original * original).sum()), rel=1e-3)


def test_product_rules_keep_the_mask_and_split_in_the_ratio_of_the_tensor_rule(lora_dir):
    plain = compeft.compress(lora_dir, density=0.1, alpha="norm")
    product = compeft.compress(lora_dir, density=0.1, alpha="product-norm")
    for name in plain.names:
        assert torch.equal(plain.to_dense(name) != 0, product.to_dense(name) != 0)
    a, b = "base_model.model.layers.1.q_proj.lora_A.weight", "base_model.model.layers.1.q_proj.lora_B.weight"
    assert product.entry(a).scale / product.entry(b).scale == pytest.approx(
        plain.entry(a).scale / plain.entry(b).scale, rel=1e-5)
    unpaired = "base_model.model.layers.0.extra.lora_A.weight"
    assert product.entry(unpaired).scale == plain.entry(unpaired).scale


def test_default_is_tensor_scope_product_unbiased_and_keeps_every_lora_b(lora_dir):
    with warnings.catch_warnings():
        warnings.simplefilter("error", FidelityWarning)
        expert = compeft.compress(lora_dir)
    assert expert.metadata["scope"] == "tensor" and expert.metadata["alpha_rule"] == "product-unbiased"
    assert expert.metadata["density"] == 0.1
    for name in expert.names:
        if "lora_B" in name or "lora_embedding_B" in name:
            assert expert.entry(name).nnz > 0, name
    head = "base_model.model.score.modules_to_save.default.weight"
    assert expert.entry(head).encoding == "dense"


def test_reference_mode_zeroes_lora_b_and_warns(lora_dir):
    with pytest.warns(FidelityWarning, match="keep no entries"):
        expert = compeft.compress(lora_dir, scope="global", alpha=1.0)
    assert all(expert.entry(n).nnz == 0 for n in expert.names if "lora_B" in n)
    summary = describe(expert.header)
    assert any("lose their whole update" in w for w in summary["warnings"])
    assert all(w.endswith("use tensor scope or a higher density") for w in summary["warnings"])


def test_fidelity_advice_names_tensor_scope_only_outside_it():
    """A file written in tensor scope (the default) is not told to use tensor scope."""
    figures = {"tensors": [[1.0, None]], "lora": [], "overall": [1.0, 0.05], "lora_overall": None}
    for scope, advice in (("tensor", "; use a higher density"), ("global", "; use tensor scope or a higher density"),
                          (None, "; use tensor scope or a higher density")):
        found = rules.fidelity_warnings(["w"], {"w": 0}, figures, [], scope)
        assert len(found) == 2 and all(w.endswith(advice) for w in found), (scope, found)


def test_fidelity_figures_equal_the_dense_computation(lora_dir):
    tensors = load_adapter_tensors(lora_dir)
    expert = compeft.compress(lora_dir, density=0.1)
    figures = expert.metadata["fidelity"]
    compressed = [n for n in expert.names if expert.entry(n).compressed]
    assert len(figures["tensors"]) == len(compressed)
    errors, squares, dots, norms = 0.0, 0.0, 0.0, 0.0
    for name, (rel, cos) in zip(compressed, figures["tensors"]):
        tau, restored = tensors[name].double(), expert.to_dense(name).double()
        assert rel == pytest.approx(float((tau - restored).norm() / tau.norm()), rel=2e-3)
        assert cos == pytest.approx(float((tau * restored).sum() / (tau.norm() * restored.norm())), rel=2e-3)
        errors += float(((tau - restored) ** 2).sum())
        squares += float((tau * tau).sum())
        dots += float((tau * restored).sum())
        norms += float((restored * restored).sum())
    assert figures["overall"][0] == pytest.approx(math.sqrt(errors / squares), rel=2e-3)
    assert figures["overall"][1] == pytest.approx(dots / math.sqrt(squares * norms), rel=2e-3)
    products = list(module_products(expert, tensors))
    assert len(figures["lora"]) == len(products)
    for (name, original, restored), (rel, cos) in zip(products, figures["lora"]):
        assert rel == pytest.approx(float((original - restored).norm() / original.norm()), rel=2e-3), name
        assert cos == pytest.approx(float((original * restored).sum() / (original.norm() * restored.norm())),
                                    rel=2e-3), name


def test_a_malformed_fidelity_key_is_shown_as_missing_not_rejected(make_tv):
    from compeft.encode import encode_source as _encode
    from compeft.sources import resolve_source as _resolve_source
    encoded = _encode(_resolve_source(make_tv(seed=1, shapes={"w": (20, 20)}), None), density=0.1, scope="tensor",
                      keep_dense=(), auto_dense=True, chunk_size=16384, metadata=None, progress=False)
    expert = encoded.build("norm", {"fidelity": {"overall": ["x", 1], "tensors": "nope"}})
    summary = describe(expert.header)
    assert summary["fidelity"]["overall"] is None
    assert summary["tensors"][0]["rel_error"] is None
    assert expert.to_dense("w").abs().sum() > 0


def test_scales_do_not_depend_on_the_thread_count(tmp_path, make_tv):
    tau = make_tv(seed=9, shapes={"w": (300, 300)})
    save_file(tau, str(tmp_path / "tau.safetensors"))
    script = ("import sys, numba, compeft; from safetensors.torch import load_file; "
              "numba.set_num_threads(int(sys.argv[1])); "
              "e = compeft.compress(load_file(sys.argv[2]), alpha='norm'); sys.stdout.buffer.write(e.to_bytes())")
    outputs = [subprocess.run([sys.executable, "-c", script, str(n), str(tmp_path / "tau.safetensors")],
                              capture_output=True, check=True).stdout for n in (1, 2)]
    assert outputs[0] == outputs[1]


@pytest.mark.parametrize("alpha", [0, -1.0, float("nan"), float("inf"), "fancy", True])
def test_bad_alphas_are_refused(make_tv, alpha):
    with pytest.raises(InvalidArgumentError):
        compeft.compress(make_tv(seed=1, shapes={"w": (10, 10)}), alpha=alpha)


def test_product_rules_need_tensor_scope(make_tv):
    with pytest.raises(InvalidArgumentError, match="scope 'tensor'"):
        compeft.compress(make_tv(seed=1, shapes={"w": (10, 10)}), alpha="product-norm", scope="global")
    # the default α follows the scope
    assert compeft.compress(make_tv(seed=1, shapes={"w": (10, 10)}), scope="global").metadata["alpha_rule"] == "unbiased"


def test_cli_compress_and_inspect_show_fidelity_and_warnings(tmp_path, lora_dir):
    out = tmp_path / "x.cpeft"
    run = subprocess.run([sys.executable, "-m", "compeft.cli", "compress", str(lora_dir), "-o", str(out)],
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert "LoRA B·A" in run.stdout and "cosine" in run.stdout and "product-unbiased" in run.stdout
    assert "warning" not in run.stderr
    run = subprocess.run([sys.executable, "-m", "compeft.cli", "compress", str(lora_dir), "-o", str(tmp_path / "r.cpeft"),
                          "--scope", "global", "--alpha", "1"], capture_output=True, text=True)
    assert run.returncode == 0
    assert "compeft: warning:" in run.stderr and "keep no entries" in run.stderr
    assert "Traceback" not in run.stderr
    run = subprocess.run([sys.executable, "-m", "compeft.cli", "inspect", str(tmp_path / "r.cpeft")],
                         capture_output=True, text=True)
    assert run.returncode == 0 and "rel.err" in run.stdout and "compeft: warning:" in run.stderr
    summary = json.loads(subprocess.run([sys.executable, "-m", "compeft.cli", "inspect", str(out), "--json"],
                                        capture_output=True, text=True, check=True).stdout)
    assert summary["warnings"] == []
    assert summary["fidelity"]["lora_overall"][1] > 0
    assert all(row["rel_error"] is not None for row in summary["tensors"] if row["encoding"] == "ternary-golomb")


def test_a_tensor_mapping_of_lora_factors_forms_pairs_too(lora_dir):
    """A LoRA state dict passed as a mapping is judged on B·A like the same adapter's directory."""
    tensors = load_adapter_tensors(lora_dir)
    factors = {n: t for n, t in tensors.items() if ".lora_" in n}
    from_mapping = compeft.compress(factors, density=0.1)
    from_dir = compeft.compress(lora_dir, density=0.1)
    assert len(from_mapping.metadata["fidelity"]["lora"]) == 7
    for name in factors:
        assert from_mapping.entry(name).scale == from_dir.entry(name).scale, name
