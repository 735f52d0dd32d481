"""``compeft merge --config`` against mergekit itself.

Tiny Llama models (transformers ``LlamaConfig``: 2 layers, hidden 64; no download) and three
fine-tunes (random perturbations of the base) are compressed with ``compeft.compress(ft, base=…)``.
compeft merges the ``.cpeft`` experts with a config; mergekit (``mergekit.merge.run_merge``) merges
the *decoded* experts (``compeft.decompress(expert, dir, base=…)``: base + τ̃) with the same config;
every tensor must agree to float32 rounding. Re-trims (TIES density below the experts' own, DARE,
breadcrumbs, DELLA, SCE's top-k) pick among tied entries by compeft's seeded rule, so they are
checked twice: exactly, against mergekit's own method applied to experts pre-trimmed by a
re-implementation of that rule here, and statistically against mergekit's full pipeline.
"""

from __future__ import annotations

import copy
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from mergekit.config import MergeConfiguration
from mergekit.merge import run_merge
from mergekit.merge_methods import registry
from mergekit.merge_methods.base import TensorGroup
from mergekit.options import MergeOptions
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig, LlamaForCausalLM

import compeft
from compeft.cli import main
from compeft.merge_run import merge_from_config
from compeft.plan import drop_key

DENSITY = 0.25  # the experts' own density: a TIES density above it trims nothing


@dataclass
class Models:
    root: Path
    base: Path
    experts: list[Path]  # .cpeft
    decoded: list[Path]  # base + τ̃, model directories for mergekit
    base_sd: dict[str, torch.Tensor]


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Models:
    root = tmp_path_factory.mktemp("mergekit")
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=4, vocab_size=128)
    LlamaForCausalLM(config).save_pretrained(root / "base")
    base_sd = load_file(str(root / "base" / "model.safetensors"))
    experts, decoded = [], []
    for i in range(3):
        ft = root / f"ft{i}"
        ft.mkdir()
        shutil.copy(root / "base" / "config.json", ft / "config.json")
        g = torch.Generator().manual_seed(100 + i)
        save_file({k: v + 0.01 * (1 + 0.3 * i) * torch.randn(v.shape, generator=g) for k, v in base_sd.items()},
                  str(ft / "model.safetensors"), {"format": "pt"})
        compeft.compress(ft, base=root / "base", density=DENSITY).save(root / f"e{i}.cpeft")
        compeft.decompress(root / f"e{i}.cpeft", root / f"dec{i}", base=root / "base")
        experts.append(root / f"e{i}.cpeft")
        decoded.append(root / f"dec{i}")
    return Models(root, root / "base", experts, decoded, base_sd)


def configs(models: Models, conf: dict) -> tuple[dict, dict]:
    """The config with ``E<i>`` as expert i's .cpeft (ours) and its decoded directory (mergekit's),
    ``BASE`` as the base directory."""
    def place(c: dict, where: list[Path]) -> dict:
        c = copy.deepcopy(c)
        for m in c["models"]:
            m["model"] = str(models.base) if m["model"] == "BASE" else str(where[int(m["model"][1:])])
        if c.get("base_model") == "BASE":
            c["base_model"] = str(models.base)
        return c
    return place(conf, models.experts), place(conf, models.decoded)


def run_mergekit(conf: dict, out: Path) -> dict[str, torch.Tensor]:
    run_merge(MergeConfiguration.model_validate(conf), str(out),
              MergeOptions(copy_tokenizer=False, write_model_card=False, quiet=True, random_seed=0))
    return load_file(str(out / "model.safetensors"))


def run_ours(conf: dict, out: Path, *extra: str) -> dict[str, torch.Tensor]:
    path = out.with_suffix(".yml")
    path.write_text(yaml.safe_dump(conf))
    assert main(["merge", "--config", str(path), "-o", str(out), "-q", *extra]) == 0
    return load_file(str(out / "model.safetensors"))


def weighted(*weights: float, **extra) -> list[dict]:
    return [{"model": f"E{i}", "parameters": {"weight": w, **extra}} for i, w in enumerate(weights)]


def plain(n: int = 3) -> list[dict]:
    return [{"model": f"E{i}"} for i in range(n)]


GTA = {"base_model": "BASE"}
EXACT = {  # no re-trim is active: equal to mergekit to float32 rounding
    "linear": ({"merge_method": "linear", "models": weighted(1.0, 0.5, 0.7)}, True),
    "linear_not_normalized": ({"merge_method": "linear", "models": weighted(0.6, 0.5, 0.7),
                               "parameters": {"normalize": False}}, True),
    "linear_base_listed": ({"merge_method": "linear", "base_model": "BASE",
                            "models": weighted(1.0, 0.5) + [{"model": "BASE", "parameters": {"weight": 0.3}}]}, False),
    "linear_base_weight_top_level": ({"merge_method": "linear", "base_model": "BASE", "models": plain(),
                                      "parameters": {"weight": 0.5}}, False),
    "passthrough": ({"merge_method": "passthrough", "models": [{"model": "E1", "parameters": {"scale": 0.5}}]}, True),
    "task_arithmetic": ({**GTA, "merge_method": "task_arithmetic", "models": weighted(1.0, 0.5, 0.7),
                         "parameters": {"lambda": 0.8}}, False),
    "task_arithmetic_normalized": ({**GTA, "merge_method": "task_arithmetic", "models": weighted(1.0, 0.5, 0.7),
                                    "parameters": {"normalize": True}}, False),
    "ties": ({**GTA, "merge_method": "ties", "models": weighted(1.0, 0.5, 0.7), "parameters": {"density": 0.5}}, False),
    "ties_equal_weights": ({**GTA, "merge_method": "ties", "models": weighted(1.0, 1.0, 1.0),
                            "parameters": {"density": 0.6, "int8_mask": True}}, False),
    "ties_negative_weight": ({**GTA, "merge_method": "ties", "models": weighted(1.0, -0.5, 0.7),
                              "parameters": {"density": 0.5, "normalize": True}}, False),
    "ties_not_normalized": ({**GTA, "merge_method": "ties", "models": weighted(1.0, 0.5, 0.7),
                             "parameters": {"normalize": False, "lambda": 0.5}}, False),
    "dare_ties_no_drops": ({**GTA, "merge_method": "dare_ties", "models": weighted(1.0, 0.5, 0.7)}, False),
    "dare_linear_no_drops": ({**GTA, "merge_method": "dare_linear", "models": weighted(1.0, 0.5, 0.7)}, False),
    "breadcrumbs_no_outliers": ({**GTA, "merge_method": "breadcrumbs", "models": weighted(1.0, 0.5, 0.7),
                                 "parameters": {"density": 0.5, "gamma": 0.0}}, False),
    "breadcrumbs_ties_no_outliers": ({**GTA, "merge_method": "breadcrumbs_ties", "models": weighted(1.0, 0.5, 0.7),
                                      "parameters": {"density": 0.5, "gamma": 0.0}}, False),
    "della_no_drops": ({**GTA, "merge_method": "della", "models": weighted(1.0, 0.5, 0.7)}, False),
    "della_linear_no_drops": ({**GTA, "merge_method": "della_linear", "models": weighted(1.0, 0.5, 0.7)}, False),
    "model_stock": ({**GTA, "merge_method": "model_stock", "models": plain()}, False),
    "model_stock_filter_wise": ({**GTA, "merge_method": "model_stock", "models": [*plain(), {"model": "BASE"}],
                                 "parameters": {"filter_wise": True}}, False),
    "nuslerp": ({**GTA, "merge_method": "nuslerp", "models": weighted(1.0, 0.5)}, False),
    "nuslerp_rows": ({**GTA, "merge_method": "nuslerp", "models": weighted(1.0, 0.5),
                      "parameters": {"nuslerp_flatten": False}}, False),
    "nuslerp_columns": ({**GTA, "merge_method": "nuslerp", "models": weighted(1.0, 0.5),
                         "parameters": {"nuslerp_flatten": "false", "nuslerp_row_wise": True}}, False),
    "sce": ({**GTA, "merge_method": "sce", "models": plain()}, False),
    # mergekit's gradient and filter syntax: per-model and top-level, lists across layers, conditions
    "gradients_and_filters": ({**GTA, "merge_method": "ties", "models": [
        {"model": f"E{i}", "parameters": {"weight": [1.0, 0.2 * i, 0.6],
                                          "density": [{"filter": "mlp", "value": 0.6}, {"value": [0.5, "9e-1"]}]}}
        for i in range(3)], "parameters": {"lambda": [1.0, 0.5], "normalize": [{"filter": "self_attn", "value": False},
                                                                             {"value": True}]}}, False),
    "gradient_linear": ({"merge_method": "linear", "models": [
        {"model": "E0", "parameters": {"weight": [0.0, 1.0]}},
        {"model": "E1", "parameters": {"weight": [{"filter": "embed", "value": 2.0}, {"value": [1.0, 0.0]}]}},
    ]}, True),
}


@pytest.mark.parametrize("case", list(EXACT))
def test_config_merge_equals_mergekit(models, tmp_path, case):
    conf, needs_base = EXACT[case]
    ours_conf, mk_conf = configs(models, conf)
    ours = run_ours(ours_conf, tmp_path / "ours", *(["--base", str(models.base)] if needs_base else []))
    ref = run_mergekit(mk_conf, tmp_path / "mk")
    assert ours.keys() == ref.keys()
    for name in ref:
        assert ours[name].dtype == ref[name].dtype
        torch.testing.assert_close(ours[name], ref[name], rtol=1e-5, atol=1e-6, msg=lambda m: f"{case} {name}: {m}")
    changed = sum(int((ours[n] != models.base_sd[n]).sum()) for n in ours)
    assert changed > 0.2 * sum(t.numel() for t in ours.values())  # a merge happened


def test_out_dtype_equals_mergekit(models, tmp_path):
    conf = {**GTA, "merge_method": "ties", "models": weighted(1.0, 0.5, 0.7), "out_dtype": "bfloat16",
            "parameters": {"density": 0.7}}
    ours_conf, mk_conf = configs(models, conf)
    ours, ref = run_ours(ours_conf, tmp_path / "ours"), run_mergekit(mk_conf, tmp_path / "mk")
    for name in ref:
        assert ours[name].dtype == ref[name].dtype == torch.bfloat16
        torch.testing.assert_close(ours[name], ref[name])
    assert json.loads((tmp_path / "ours" / "config.json").read_text()).get("dtype", "bfloat16") == "bfloat16"


# ---------------------------------------------------------------------------------------------
# re-trims: compeft's tie rule, re-implemented here


MASK = (1 << 64) - 1


def splitmix64(x: int) -> int:
    z = (x + 0x9E3779B97F4A7C15) & MASK
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK
    return z ^ (z >> 31)


def hashes(key: int, count: int) -> np.ndarray:
    return np.array([splitmix64(key + e) >> 1 for e in range(count)], dtype=np.uint64)


def trimmed(tau: torch.Tensor, key: int, method: str, density: float, gamma: float = 0.0, epsilon: float = 0.0,
            rescale: bool = False) -> torch.Tensor:
    """Expert τ̃ re-trimmed by compeft's rule (docs/merging.md): kept entries in position order,
    h(e) = splitmix64(key + e) >> 1; of tied magnitudes the largest h survive; DARE keeps
    h ≥ (1 − density)·2^63; DELLA ranks a row's entries by magnitude then h and draws its
    Bernoulli from splitmix64(h) >> 11 / 2^53."""
    flat = tau.reshape(-1)
    where = torch.nonzero(flat).reshape(-1)
    nnz, numel = where.numel(), flat.numel()
    h = hashes(key, nnz)
    if method == "magnitude":
        kept = min(nnz, max(1, int(density * numel)))
        keep = np.zeros(nnz, bool)
        keep[np.argsort(h)[nnz - kept:]] = True
    elif method == "magnitude_outliers":
        target, top = int(density * numel), int(gamma * numel)
        bottom = max(0, numel - target - top)
        kept = max(0, min(bottom + target, numel) - max(bottom, numel - nnz))
        keep = np.zeros(nnz, bool)
        keep[np.argsort(h)[nnz - kept:]] = True
    elif method == "random":
        keep = h >= np.uint64(int((1 - density) * 2 ** 63))
    else:  # della, per row of a 2-D tensor (a 1-D tensor is one row)
        n = tau.shape[-1] if tau.dim() == 2 else numel
        keep = np.zeros(nnz, bool)
        rows = (where // n).numpy()
        for row in np.unique(rows):
            members = np.nonzero(rows == row)[0]
            ranked = members[np.argsort(h[members])]  # one magnitude: by hash
            for j, e in enumerate(ranked):
                rank = (n - len(members)) + j
                p = density - epsilon + rank / (n - 1) * 2 * epsilon
                keep[e] = (splitmix64(int(h[e])) >> 11) * 2.0 ** -53 < p
    out = torch.zeros_like(flat)
    out[where[torch.from_numpy(keep)]] = flat[where[torch.from_numpy(keep)]]
    if rescale and keep.any():
        out = out * (float(flat.abs().double().sum()) / float(out.abs().double().sum()))
    return out.reshape(tau.shape)


TRIMS = {  # method, its sparsification, its parameters, per-model weights
    "ties_below_expert_density": ("ties", "magnitude", {"density": 0.1}),
    "ties_rescaled": ("ties", "magnitude", {"density": 0.15, "rescale": True}),
    "breadcrumbs": ("breadcrumbs", "magnitude_outliers", {"density": 0.2}),
    "breadcrumbs_ties": ("breadcrumbs_ties", "magnitude_outliers", {"density": 0.15, "gamma": 0.05}),
    "dare_ties": ("dare_ties", "random", {"density": 0.5}),
    "dare_linear": ("dare_linear", "random", {"density": 0.3, "normalize": True}),
    "della": ("della", "della", {"density": 0.5, "epsilon": 0.1}),
    "della_linear": ("della_linear", "della", {"density": 0.4, "epsilon": 0.2}),
}
WEIGHTS = [1.0, 0.5, 0.7]
SEED = 5


@pytest.mark.parametrize("case", list(TRIMS))
def test_retrims_follow_the_tie_rule_exactly(models, case):
    """Ours == mergekit's own method (density 1) on the experts pre-trimmed by the tie rule."""
    method, sparsify, params = TRIMS[case]
    shared = {k: v for k, v in params.items() if k in ("rescale", "normalize")}
    per = {k: v for k, v in params.items() if k not in shared}
    ours_conf, _ = configs(models, {**GTA, "merge_method": method, "models": weighted(*WEIGHTS), "parameters": params})
    ours = merge_from_config(ours_conf, seed=SEED)
    mk = registry.get(method)
    defaults = {p.name: p.default for p in mk.spec.parameters}
    rescale = shared.get("rescale", defaults["rescale"])
    experts = [compeft.open(p) for p in models.experts]
    before = after = 0
    for name in experts[0].names:
        taus = [e.to_dense(name).float() for e in experts]
        inputs = [trimmed(t, drop_key(SEED, i, name), sparsify, per["density"], per.get("gamma", 0.01),
                          per.get("epsilon", 0.15), rescale) for i, t in enumerate(taus)]
        before += sum(int((t != 0).sum()) for t in taus)
        after += sum(int((t != 0).sum()) for t in inputs)
        group = TensorGroup.from_tensors([torch.zeros_like(taus[0]), *inputs], base_index=0)
        (ref,) = mk((group,), parameters={**shared, "weight": WEIGHTS, "density": 1.0})
        torch.testing.assert_close(ours[name], ref, rtol=1e-5, atol=1e-7, msg=lambda m: f"{case} {name}: {m}")
    assert 0.2 * before < after < 0.9 * before  # the re-trim is active


def test_sce_top_k_follows_the_tie_rule_exactly(models):
    """SCE's variance top-k: ties broken by the larger position hash (key drop_key(seed, -1, name))."""
    ours_conf, _ = configs(models, {**GTA, "merge_method": "sce", "models": plain(),
                                    "parameters": {"select_topk": 0.5}})
    ours = merge_from_config(ours_conf, seed=SEED)
    experts = [compeft.open(p) for p in models.experts]
    for name in experts[0].names:
        taus = [e.to_dense(name).double().reshape(-1) for e in experts]
        mean = sum(taus) / 3
        var = sum((t - mean) ** 2 for t in taus) / 3  # the documented order: expert by expert
        k = int(int((var != 0).sum()) * 0.5)
        h = hashes(drop_key(SEED, -1, name), var.numel())
        order = np.lexsort((h, var.numpy()))
        mask = torch.zeros(var.numel(), dtype=torch.bool)
        mask[torch.from_numpy(order[var.numel() - k:])] = True
        group = TensorGroup.from_tensors([torch.zeros(taus[0].shape), *[(t * mask).float() for t in taus]],
                                         base_index=0)
        (ref,) = registry.get("sce")((group,), parameters={"select_topk": 1.0})
        torch.testing.assert_close(ours[name].reshape(-1), ref, rtol=1e-5, atol=1e-7)


STATISTICAL = {  # mergekit's full pipeline draws its own drops and ties: compare the merges' statistics
    **{case: (m, p) for case, (m, _, p) in TRIMS.items()},
    "sce_top_k": ("sce", {"select_topk": 0.5}),
}


@pytest.mark.parametrize("case", list(STATISTICAL))
def test_retrims_match_mergekit_statistically(models, tmp_path, case):
    method, params = STATISTICAL[case]
    conf = {**GTA, "merge_method": method, "models": plain() if method == "sce" else weighted(*WEIGHTS),
            "parameters": params}
    ours_conf, mk_conf = configs(models, conf)
    ours, ref = run_ours(ours_conf, tmp_path / "ours"), run_mergekit(mk_conf, tmp_path / "mk")
    a = torch.cat([(ours[n] - models.base_sd[n]).reshape(-1) for n in ref])
    b = torch.cat([(ref[n] - models.base_sd[n]).reshape(-1) for n in ref])
    # mergekit breaks the ties among an expert's equal magnitudes by float noise (that of base + τ̃
    # − base), which favours the same positions in every expert; ours is uniform: allow 10 %
    assert abs(float((a != 0).float().mean()) / float((b != 0).float().mean()) - 1) < 0.1, case
    assert abs(float(a.abs().sum()) / float(b.abs().sum()) - 1) < 0.1, case
    assert abs(float(a.norm()) / float(b.norm()) - 1) < 0.1, case


# ---------------------------------------------------------------------------------------------
# union: experts holding different tensors are decoded onto the base (the missing ones are the
# base's), which is exactly what --union computes


@pytest.mark.parametrize("method, params", [("ties", {"density": 0.5}), ("linear", {}), ("model_stock", {}),
                                            ("dare_linear", {})])
def test_union_equals_mergekit_on_decoded_experts(models, tmp_path, method, params):
    experts = [compeft.open(p) for p in models.experts]
    drop = [lambda n: "layers.1.mlp" in n, lambda n: "layers.0.self_attn" in n, lambda n: False]
    paths, decoded = [], []
    for i, (e, skip) in enumerate(zip(experts, drop)):
        mapping = {n: e.to_dense(n) for n in e.names if not skip(n)}
        partial = compeft.compress(mapping, density=0.5)  # τ̃ of τ̃: the same support, a new magnitude
        paths.append(tmp_path / f"u{i}.cpeft")
        partial.save(paths[-1])
        decoded.append(tmp_path / f"udec{i}")
        compeft.decompress(partial, decoded[-1], base=models.base)
    conf = {"merge_method": method, "models": plain() if method == "model_stock" else weighted(*WEIGHTS),
            "parameters": params}
    if method != "linear":
        conf["base_model"] = "BASE"
    ours_conf, mk_conf = configs(Models(models.root, models.base, paths, decoded, models.base_sd), conf)
    base_flag = ["--base", str(models.base)] if method == "linear" else []
    ours = run_ours(ours_conf, tmp_path / "ours", "--union", *base_flag)
    ref = run_mergekit(mk_conf, tmp_path / "mk")
    for name in ref:
        torch.testing.assert_close(ours[name], ref[name], rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")
    # without --union the same config is refused, naming the option
    assert main(["merge", "--config", str(tmp_path / "ours.yml"), "-o", str(tmp_path / "x"), "-q", *base_flag]) == 2
