#!/usr/bin/env python
"""compeft merge benchmark: compeft.merge from compressed streams vs decompress-then-merge with PEFT.

    python benchmarks/merge.py            # full: experts of 24 x 4096x1024 bf16 (100.7M params each)
    python benchmarks/merge.py --quick    # smoke run: experts of 8 x 1024x1024 (8.4M params each)
    python benchmarks/merge.py --out results.json
    python benchmarks/merge.py --cases mergekit   # only case 4: a mergekit config vs mergekit-yaml

Prints a table and writes every figure as JSON (default
``benchmarks/results/<date>-<shortcommit>-merge[-quick].json``). Every timed call runs in its own
subprocess (this script with ``--worker``), so each case's peak RSS (``ru_maxrss``) is its own. See
``benchmarks/README.md`` ("Merge benchmark") for what each case measures and how to read it.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
PAGE = 4096
CASES = ("peft", "scaling", "mergekit")  # cases 1-2 (vs PEFT), 3 (scaling), 4 (a mergekit config)
PASSIVE = {"OMP_WAIT_POLICY": "passive"}  # an info row: OpenMP pools sleep instead of spinning between regions


# ---------------------------------------------------------------------------------------------
# worker: one timed call in a fresh process (imports the same modules whatever it runs)


def _rss_now() -> int:
    return int(Path("/proc/self/statm").read_text().split()[1]) * PAGE


def _peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _load_peft_merge_utils() -> Any:
    """PEFT's ``peft/utils/merge_utils.py``, executed as a standalone module: the same functions as
    ``peft.utils.merge_utils`` (the file imports only torch, warnings and typing), without running
    ``peft/__init__`` (transformers, accelerate: ~4.5 s and ~110 MB per process here)."""
    import importlib.util
    spec = importlib.util.find_spec("peft")  # locates the package without importing it
    assert spec is not None and spec.submodule_search_locations
    path = Path(next(iter(spec.submodule_search_locations))) / "utils" / "merge_utils.py"
    module_spec = importlib.util.spec_from_file_location("peft_merge_utils_standalone", path)
    assert module_spec is not None and module_spec.loader is not None
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


def _ours(paths: list[str], method: str) -> dict[str, Any]:
    import compeft
    return compeft.merge([compeft.open(p) for p in paths], method=method, weights=[1.0] * len(paths), lam=1.0)


def _baseline(paths: list[str], method: str, merge_utils: Any, names: list[str] | None = None) -> dict[str, Any]:
    """Decompress every expert to dense float32, then PEFT's merge per tensor."""
    import torch

    import compeft
    dense = []
    for p in paths:
        sd = compeft.open(p).state_dict(names)
        dense.append({k: v.float() for k, v in sd.items()})
        del sd
    weights = torch.ones(len(paths))
    out = {}
    for name in dense[0]:
        tensors = [d[name] for d in dense]
        if method == "ties":
            out[name] = merge_utils.ties(tensors, weights, density=1.0, majority_sign_method="total")
        elif method == "task_arithmetic":
            out[name] = merge_utils.task_arithmetic(tensors, weights)
        else:
            raise ValueError(method)
    return out


def worker(spec: dict[str, Any]) -> dict[str, Any]:
    import warnings
    warnings.simplefilter("ignore")  # PEFT warns "density >= 1, no pruning" on every call

    import numba
    import torch

    import compeft
    compeft.merge  # noqa: B018 - load the merging module (lazy attribute)
    merge_utils = _load_peft_merge_utils()  # both kinds load it, so both processes start equal
    kind, method, paths, tiny = spec["kind"], spec["method"], spec["paths"], spec["tiny"]
    info: dict[str, Any] = {"kind": kind, "method": method, "n_experts": len(paths), "loadavg": os.getloadavg(),
                            "peft_merge_utils_file": merge_utils.__file__,
                            "numba_threads": numba.get_num_threads(), "torch_threads": torch.get_num_threads(),
                            "rss_after_imports_bytes": _rss_now(), "peak_rss_after_imports_bytes": _peak_rss()}

    if kind == "verify":  # untimed: ours in full, PEFT's on a few tensors, compared
        ours = _ours(paths, method)
        ref = _baseline(paths, method, merge_utils, spec["names"])
        checks = {}
        for name in spec["names"]:
            a, b = ours[name], ref[name]
            diff = (a - b).abs()
            entry: dict[str, Any] = {"numel": a.numel(), "max_abs_diff": float(diff.max()),
                                     "max_abs_ref": float(b.abs().max()),
                                     "exactly_equal_fraction": float((a == b).float().mean()),
                                     "differing_entries": int((a != b).sum())}
            try:
                torch.testing.assert_close(a, b)
                entry["assert_close"] = True
            except AssertionError as exc:
                entry["assert_close"] = False
                entry["assert_close_message"] = str(exc)[:1000]
            checks[name] = entry
        info["checks"] = checks
        info["all_close"] = all(c["assert_close"] for c in checks.values())
        return info

    # warm-up on two tiny experts: loads Numba's cached kernels (and PEFT's/torch's first-call
    # paths) without allocating anything like the timed call's memory, so the peak is the timed call's
    if kind == "ours":
        _ours(tiny, method)
    else:
        _baseline(tiny, method, merge_utils)
    gc.collect()
    info["rss_after_warmup_bytes"] = _rss_now()
    info["peak_rss_after_warmup_bytes"] = _peak_rss()
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    start = time.perf_counter()
    result = _ours(paths, method) if kind == "ours" else _baseline(paths, method, merge_utils)
    info["time_s"] = time.perf_counter() - start
    info["minor_faults"] = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
    info["peak_rss_bytes"] = _peak_rss()
    info["result_tensors"] = len(result)
    info["result_params"] = sum(t.numel() for t in result.values())
    return info


# ---------------------------------------------------------------------------------------------
# case 4: one mergekit config, `compeft merge --config` on the experts vs `mergekit-yaml` on the
# decoded experts (base + τ̃ model directories), each command in its own process


def llama_config(quick: bool) -> Any:
    """A Llama-architecture model mergekit knows: ~111M parameters (~6.6M with --quick), bf16."""
    from transformers import LlamaConfig
    if quick:
        return LlamaConfig(hidden_size=256, intermediate_size=704, num_hidden_layers=4, num_attention_heads=4,
                           num_key_value_heads=4, vocab_size=4096, tie_word_embeddings=False)
    return LlamaConfig(hidden_size=1024, intermediate_size=2816, num_hidden_layers=8, num_attention_heads=16,
                       num_key_value_heads=16, vocab_size=4096, tie_word_embeddings=False)


def make_llama_experts(work: Path, quick: bool, n: int, seed: int, density: float, log: Any) -> dict[str, Any]:
    """The base (random, bf16), n fine-tunes = base + 0.01·(1 + 0.1 i)·N(0, 1) per tensor, each
    compressed with ``compeft.compress(ft_dir, base=base_dir, density=…)`` (a full fine-tune: the
    expert carries the base's fingerprint) and decoded onto the base for mergekit."""
    import shutil

    import torch
    from safetensors.torch import save_file
    from transformers import LlamaForCausalLM

    import compeft
    config = llama_config(quick)
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in LlamaForCausalLM(config).state_dict().items()}
    config.torch_dtype = "bfloat16"
    config.architectures = ["LlamaForCausalLM"]
    g = torch.Generator().manual_seed(seed)
    base = {k: (torch.ones(s) if len(s) == 1 else torch.randn(s, generator=g) * 0.02).to(torch.bfloat16)
            for k, s in sorted(shapes.items())}
    (work / "base").mkdir()
    save_file(base, str(work / "base" / "model.safetensors"), {"format": "pt"})
    (work / "base" / "config.json").write_text(config.to_json_string())
    (work / "base-f32").mkdir()  # the same values in float32, for the outputs check only (see mergekit_case)
    save_file({k: v.float() for k, v in base.items()}, str(work / "base-f32" / "model.safetensors"), {"format": "pt"})
    shutil.copy(work / "base" / "config.json", work / "base-f32" / "config.json")
    params = sum(t.numel() for t in base.values())
    experts, decoded, compress_s = [], [], []
    for i in range(n):
        ft = work / "ft"
        ft.mkdir()
        shutil.copy(work / "base" / "config.json", ft / "config.json")
        save_file({k: (v.float() + 0.01 * (1 + 0.1 * i) * torch.randn(v.shape, generator=g)).to(torch.bfloat16)
                   for k, v in base.items()}, str(ft / "model.safetensors"), {"format": "pt"})
        t0 = time.perf_counter()
        expert = compeft.compress(ft, base=work / "base", density=density)
        compress_s.append(time.perf_counter() - t0)
        experts.append(work / f"expert-{i}.cpeft")
        expert.save(experts[-1])
        shutil.rmtree(ft)
        decoded.append(work / f"decoded-{i}")
        compeft.decompress(experts[-1], decoded[-1], base=work / "base")
        compeft.decompress(experts[-1], work / f"decoded-f32-{i}", base=work / "base-f32", check_base=False)
        log(f"  llama expert {i}: {experts[-1].stat().st_size:,} B compressed, compress {compress_s[-1]:.1f} s")
    return {"base": work / "base", "experts": experts, "decoded": decoded, "params": params,
            "tensors": len(base), "compress_s_per_expert_single_run": compress_s, "config": config.to_dict()}


def merge_config(models: list[Path], base: Path, dtype: str = "bfloat16") -> dict[str, Any]:
    """The benchmark's config: TIES (mergekit's rule), density 0.5, unequal weights, bf16 (the
    timed recipe); ``dtype="float32"`` (then ``out_dtype: bfloat16``) for the outputs check."""
    return {"merge_method": "ties", "base_model": str(base), "dtype": dtype,
            **({"out_dtype": "bfloat16"} if dtype != "bfloat16" else {}),
            "parameters": {"density": 0.5, "normalize": True},
            "models": [{"model": str(m), "parameters": {"weight": round(1.0 - 0.08 * i, 2)}} for i, m in enumerate(models)]}


# A tiny launcher between this process and the timed command: a child's ru_maxrss starts at its
# parent's peak (Linux carries it across fork and exec), so the command is forked from this small
# process, never from the benchmark's (which holds torch and the data).
LAUNCHER = """
import json, os, sys, time
start = time.perf_counter()
pid = os.fork()
if pid == 0:
    null = os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 1)
    os.execvp(sys.argv[1], sys.argv[1:])
_, status, usage = os.wait4(pid, 0)
print(json.dumps({"wall_s": time.perf_counter() - start, "status": status, "maxrss_kib": usage.ru_maxrss,
                  "user_s": usage.ru_utime, "system_s": usage.ru_stime, "minor_faults": usage.ru_minflt}))
"""


def timed_command(argv: list[str]) -> dict[str, Any]:
    """Run one command in its own process: its wall time and its own peak RSS (wait4's rusage)."""
    proc = subprocess.run([sys.executable, "-c", LAUNCHER, *argv], cwd=REPO, capture_output=True, text=True,
                          check=False)
    if proc.returncode != 0 or not proc.stdout.strip():
        raise RuntimeError(f"{argv[:3]} failed: {proc.stderr[-3000:]}")
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    if got["status"] != 0:
        raise RuntimeError(f"{argv[:3]} failed ({got['status']}): {proc.stderr[-3000:]}")
    return {"wall_s": got["wall_s"], "peak_rss_bytes": got["maxrss_kib"] * 1024, "user_s": got["user_s"],
            "system_s": got["system_s"], "minor_faults": got["minor_faults"]}


def compare_models(ours: Path, ref: Path, base: Path) -> dict[str, Any]:
    """Every tensor of the two outputs: the bit-identical fraction and the largest |diff| in units
    of the bf16 spacing at the largest of the two values and the base's (a merge that cancels the
    base is judged on the scale of its inputs)."""
    import torch
    from safetensors.torch import load_file
    a, b = load_file(str(ours / "model.safetensors")), load_file(str(ref / "model.safetensors"))
    w = load_file(str(base / "model.safetensors"))
    same = total = 0
    worst = 0.0
    for name in b:
        x, y = a[name].float(), b[name].float()
        same += int((a[name] == b[name]).sum())
        total += y.numel()
        _, exponent = torch.frexp(torch.maximum(torch.maximum(x.abs(), y.abs()), w[name].float().abs()))
        spacing = torch.ldexp(torch.ones_like(x), exponent - 8)  # bf16: 8 significant bits
        worst = max(worst, float(((x - y).abs() / spacing).max()))
    return {"tensors": len(b), "same_keys": a.keys() == b.keys(), "dtypes_equal": all(a[n].dtype == b[n].dtype for n in b),
            "bit_identical_fraction": same / total, "max_diff_bf16_spacings": worst,
            "equal_within_bf16_rounding": a.keys() == b.keys() and worst <= 1.0}


def mergekit_case(work: Path, quick: bool, n: int, seed: int, density: float, rounds: int, log: Any) -> dict[str, Any]:
    import shutil

    import yaml
    work.mkdir(parents=True, exist_ok=True)
    log(f"case 4 (mergekit): building {n} Llama experts")
    data = make_llama_experts(work, quick, n, seed, density, log)
    ours_yml, mk_yml = work / "ours.yml", work / "mergekit.yml"
    ours_yml.write_text(yaml.safe_dump(merge_config(data["experts"], data["base"])))
    mk_yml.write_text(yaml.safe_dump(merge_config(data["decoded"], data["base"])))
    mergekit_yaml = shutil.which("mergekit-yaml")
    ours_argv = [sys.executable, "-m", "compeft.cli", "merge", "--config", str(ours_yml), "-o", str(work / "out-ours"),
                 "-q"]
    mk_argv = ([mergekit_yaml] if mergekit_yaml else [sys.executable, "-m", "mergekit.scripts.run_yaml"]) + [
        str(mk_yml), str(work / "out-mergekit"), "--no-copy-tokenizer", "--no-write-model-card", "--quiet"]
    runs: dict[str, list[dict[str, Any]]] = {"ours": [], "mergekit": []}
    for rnd in range(rounds + 1):  # round 0: ours warms up (Numba's cache), not counted; the files are in the
        for kind, argv in (("ours", ours_argv), ("mergekit", mk_argv)):  # page cache already (just written)
            if rnd == 0 and kind == "mergekit":
                continue
            shutil.rmtree(work / f"out-{kind}", ignore_errors=True)  # the last round's outputs are compared
            res = timed_command(argv)
            log(f"  round {rnd} {kind}: {res['wall_s']:.2f} s, peak RSS {fmt_mb(res['peak_rss_bytes'])}")
            if rnd:
                runs[kind].append(res)
    timed_outputs = compare_models(work / "out-ours", work / "out-mergekit", data["base"])
    # The outputs check. mergekit's inputs above are bf16 models, bf16(base + τ̃), which do not hold
    # τ̃ exactly, and with dtype bfloat16 it computes in bf16: TIES elections near a cancellation
    # then differ from compeft's float32 ones. So both also run with dtype float32 (out_dtype
    # bfloat16), mergekit on the experts decoded onto a float32 copy of the base (exact τ̃).
    log("  outputs check: dtype float32, mergekit on float32 decoded experts")
    (work / "ours-f32.yml").write_text(yaml.safe_dump(merge_config(data["experts"], data["base"], "float32")))
    (work / "mergekit-f32.yml").write_text(yaml.safe_dump(merge_config(
        [work / f"decoded-f32-{i}" for i in range(n)], work / "base-f32", "float32")))
    for kind, yml in (("ours", "ours-f32.yml"), ("mergekit", "mergekit-f32.yml")):
        shutil.rmtree(work / f"out-{kind}", ignore_errors=True)
        argv = ours_argv if kind == "ours" else mk_argv
        timed_command([str(work / yml) if a == str(ours_yml if kind == "ours" else mk_yml) else a for a in argv])
    check = compare_models(work / "out-ours", work / "out-mergekit", data["base"])
    o, m = ({"median_s": statistics.median(r["wall_s"] for r in runs[k]), "min_s": min(r["wall_s"] for r in runs[k]),
             "peak_rss_bytes_median": statistics.median(r["peak_rss_bytes"] for r in runs[k]), "runs": runs[k]}
            for k in ("ours", "mergekit"))
    return {"n_experts": n, "data": {k: v for k, v in data.items() if k not in ("experts", "decoded", "base")},
            "config": merge_config(["<expert i>.cpeft"] * n, Path("<base>")),
            "ours_command": " ".join(ours_argv[1:]), "mergekit_command": " ".join(mk_argv),
            "ours": o, "mergekit": m, "speedup_median": m["median_s"] / o["median_s"],
            "time_ratio_median": o["median_s"] / m["median_s"],
            "peak_rss_ratio": o["peak_rss_bytes_median"] / m["peak_rss_bytes_median"], "outputs": check,
            "timed_outputs_bf16_compute": timed_outputs}


# ---------------------------------------------------------------------------------------------
# parent


# The workers are forked from a small launcher, not from this process, for the same reason as
# LAUNCHER: a worker exec'd straight from here started with this process's peak RSS (which grows
# as it generates the experts) as its own ru_maxrss, and reported it when its merge used less.
WORKER_LAUNCHER = """
import os, sys
pid = os.fork()
if pid == 0:
    os.execvp(sys.argv[1], sys.argv[1:])
_, status, _ = os.wait4(pid, 0)
sys.exit(os.waitstatus_to_exitcode(status))
"""


def run_worker(spec: dict[str, Any], env: dict[str, str] | None = None) -> dict[str, Any]:
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-S", "-c", WORKER_LAUNCHER, sys.executable, str(Path(__file__).resolve()),
                           "--worker", json.dumps(spec)],
                          capture_output=True, text=True, cwd=REPO, check=False,
                          env=None if env is None else {**os.environ, **env})
    if proc.returncode != 0:
        raise RuntimeError(f"worker {spec['kind']} {spec['method']} N={len(spec['paths'])} failed "
                           f"({proc.returncode}): {proc.stderr.strip()[-3000:]}")
    out: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    out["process_wall_s"] = time.perf_counter() - start
    out["extra_env"] = env or {}
    return out


def make_expert(seed: int, expert: int, tensors: int, shape: tuple[int, int], df: float, scale: float) -> dict[str, Any]:
    """One task vector: ``tensors`` bf16 tensors of Student-t(df) * scale, one generator per tensor."""
    import numpy as np
    import torch
    out = {}
    for t in range(tensors):
        rng = np.random.default_rng([seed, expert, t])
        x = rng.standard_t(df, size=shape).astype(np.float32)
        x *= np.float32(scale)
        out[f"model.layers.{t}.delta.weight"] = torch.from_numpy(x).to(torch.bfloat16)
    return out


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    times = [r["time_s"] for r in runs]
    peaks = [r["peak_rss_bytes"] for r in runs]
    floors = [r["rss_after_warmup_bytes"] for r in runs]  # current RSS just before the timed call
    nets = [p - f for p, f in zip(peaks, floors)]
    return {"median_s": statistics.median(times), "min_s": min(times), "times_s": times,
            "peak_rss_bytes_median": statistics.median(peaks), "peak_rss_bytes_max": max(peaks),
            "peak_rss_bytes": peaks, "rss_floor_bytes_median": statistics.median(floors),
            "net_peak_rss_bytes_median": statistics.median(nets), "net_peak_rss_bytes": nets,
            "minor_faults_median": statistics.median(r["minor_faults"] for r in runs), "runs": runs}


def fmt_mb(x: float) -> str:
    return f"{x / 2**20:,.0f} MiB"


def build_table(r: dict[str, Any]) -> list[dict[str, str]]:
    from run import fmt_s, table_row

    rows: list[dict[str, str]] = []

    def add(*args: Any, **kwargs: Any) -> None:
        rows.append(table_row(*args, **kwargs))

    for i, method in ((1, "ties"), (2, "task_arithmetic")):
        if method not in r["cases"]:
            continue
        c = r["cases"][method]
        o, b = c["ours"], c["baseline"]
        n = c["n_experts"]
        add(f"{i} {method} N={n} time vs decompress + peft {method}", fmt_s(o["median_s"]), fmt_s(b["median_s"]),
            c["time_ratio_median"], 0.07)  # issue 16 (was 0.1)
        add(f"{i} {method} N={n} peak RSS vs decompress + peft {method}", fmt_mb(o["peak_rss_bytes_median"]),
            fmt_mb(b["peak_rss_bytes_median"]), c["peak_rss_ratio"], 0.25)
        add(f"{i} {method} N={n} peak RSS above warm process ({fmt_mb(o['rss_floor_bytes_median'])} / "
            f"{fmt_mb(b['rss_floor_bytes_median'])})", fmt_mb(o["net_peak_rss_bytes_median"]),
            fmt_mb(b["net_peak_rss_bytes_median"]), c["net_peak_rss_ratio"], None)
        add(f"{i} {method} N={n} time, ours with OMP_WAIT_POLICY=passive vs ours (defaults)",
            fmt_s(c["ours_omp_wait_passive"]["median_s"]), fmt_s(o["median_s"]),
            c["ours_passive_vs_ours_default_median"], None)
        v = c["verify"]
        worst = max(x["max_abs_diff"] for x in v["checks"].values())
        add(f"{i} {method} N={n} outputs agree ({len(v['checks'])} tensors, assert_close)",
            f"max |diff| {worst:.3g}", f"max |ref| {max(x['max_abs_ref'] for x in v['checks'].values()):.3g}",
            None, None, "pass" if v["all_close"] else "FAIL")
    k = r["cases"].get("mergekit")
    if k:
        n = k["n_experts"]
        add(f"4 mergekit config (ties, N={n}, {k['data']['params']:,} params): time, compeft merge --config vs "
            "mergekit-yaml on decoded experts", fmt_s(k["ours"]["median_s"]), fmt_s(k["mergekit"]["median_s"]),
            k["time_ratio_median"], 0.1)
        add(f"4 mergekit config N={n}: peak RSS", fmt_mb(k["ours"]["peak_rss_bytes_median"]),
            fmt_mb(k["mergekit"]["peak_rss_bytes_median"]), k["peak_rss_ratio"], 0.25)
        c = k["outputs"]
        add(f"4 mergekit config N={n}: outputs agree (dtype float32, out_dtype bf16; {c['tensors']} tensors)",
            f"{c['bit_identical_fraction']:.4%} bit-identical", f"max {c['max_diff_bf16_spacings']:.2f} bf16 spacings",
            None, None, "pass" if c["equal_within_bf16_rounding"] else "FAIL")
        c = k["timed_outputs_bf16_compute"]
        add(f"4 mergekit config N={n}: timed outputs (mergekit computes in bf16 on bf16 decoded models)",
            f"{c['bit_identical_fraction']:.4%} bit-identical", f"max {c['max_diff_bf16_spacings']:.2f} bf16 spacings",
            None, None)
    s = r["cases"].get("scaling")
    for point in s["points"] if s else []:
        add(f"3 ties scaling N={point['n_experts']:>2} ({point['total_nnz']:,} kept; peak RSS "
            f"{fmt_mb(point['peak_rss_bytes_median'])}): ns per kept entry, vs N={s['largest_n']}",
            fmt_s(point["median_s"]), f"{point['ns_per_kept_entry']:.2f} ns", point["per_entry_vs_largest"], None)
    if s:
        fit = s["linear_fit"]
        add(f"3 ties scaling fit t = a + b*nnz (R^2 {fit['r2']:.4f}): a, b", fmt_s(fit["intercept_s"]),
            f"{fit['slope_ns_per_entry']:.2f} ns", None, None)
    return rows


def linear_fit(xs: list[float], ys: list[float]) -> dict[str, float]:
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    sxy = sum((x - mx) * (y - my) for x, y in zip(xs, ys))
    slope = sxy / sxx if sxx else 0.0
    intercept = my - slope * mx
    ss_res = sum((y - intercept - slope * x) ** 2 for x, y in zip(xs, ys))
    ss_tot = sum((y - my) ** 2 for y in ys)
    return {"intercept_s": intercept, "slope_ns_per_entry": slope * 1e9, "r2": 1 - ss_res / ss_tot if ss_tot else 1.0}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small experts (8.4M params), under a minute or two")
    parser.add_argument("--out", type=Path, help="JSON path (default benchmarks/results/<date>-<commit>-merge.json)")
    parser.add_argument("--workdir", type=Path, help="where the temporary files go (default: a temp dir)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rounds", type=int, default=3, help="timed processes per case and kind (interleaved)")
    parser.add_argument("--cases", default=",".join(CASES),
                        help=f"comma-separated cases to run (default all: {','.join(CASES)})")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return 0
    wanted = set(args.cases.split(","))
    if not wanted or wanted - set(CASES):
        parser.error(f"--cases: choose from {','.join(CASES)}")

    import datetime
    import importlib.metadata
    import tempfile

    import numba
    import torch

    import compeft
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from run import git_info, machine_info, versions, write_report

    tensors, shape = (8, (1024, 1024)) if args.quick else (24, (4096, 1024))
    df, scale, density = 3.0, 0.01, 0.1
    n_main = 8
    scaling_ns = [1, 2, 4, 8, 16]
    n_experts = max(scaling_ns)
    started = time.perf_counter()
    machine = machine_info()
    git = git_info()
    date = datetime.datetime.now(datetime.timezone.utc)
    out_path = args.out or REPO / "benchmarks" / "results" / (
        f"{date:%Y-%m-%d}-{git['short']}-merge{'' if wanted == set(CASES) else '-' + '-'.join(sorted(wanted))}"
        f"{'-quick' if args.quick else ''}.json")
    params = tensors * shape[0] * shape[1]
    notes: list[str] = []

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - started:7.1f}s] {msg}", file=sys.stderr, flush=True)

    tmp = tempfile.TemporaryDirectory(prefix="compeft-merge-bench-", dir=args.workdir)
    work = Path(tmp.name)
    paths: list[str] = []
    nnz: list[int] = []
    file_bytes: list[int] = []
    compress_s: list[float] = []
    tiny: list[str] = []
    verify_names: list[str] = []
    if wanted & {"peft", "scaling"}:
        log(f"generating and compressing {n_experts} experts of {tensors} x {shape[0]}x{shape[1]} bf16 "
            f"({params:,} params each), Student-t(df={df}) x {scale}, density {density}")
        for i in range(n_experts):
            mapping = make_expert(args.seed, i, tensors, shape, df, scale)
            t0 = time.perf_counter()
            expert = compeft.compress(mapping, density=density)
            compress_s.append(time.perf_counter() - t0)
            path = work / f"expert-{i:02d}.cpeft"
            expert.save(path)
            del mapping, expert
            gc.collect()
            opened = compeft.open(path)
            nnz.append(sum(opened.entry(name).nnz for name in opened.names))
            file_bytes.append(path.stat().st_size)
            paths.append(str(path))
            log(f"  expert {i}: {nnz[-1]:,} kept, {file_bytes[-1]:,} B, compress {compress_s[-1]:.2f} s")
        for i in range(2):  # the warm-up experts: 2 tensors of 64x64
            path = work / f"tiny-{i}.cpeft"
            compeft.compress(make_expert(args.seed + 1, i, 2, (64, 64), df, scale), density=density).save(path)
            tiny.append(str(path))
        names = compeft.open(paths[0]).names
        verify_names = names if args.quick else [names[0], names[len(names) // 3], names[2 * len(names) // 3], names[-1]]

    cases: dict[str, Any] = {}
    for method in ("ties", "task_arithmetic") if "peft" in wanted else ():
        log(f"case {method}: N={n_main}, {args.rounds} rounds of (ours, baseline) processes")
        main_paths = paths[:n_main]
        runs: dict[str, list[dict[str, Any]]] = {"ours": [], "baseline": [], "ours_passive": []}
        for rnd in range(args.rounds):
            for kind, kind_runs in runs.items():
                res = run_worker({"kind": kind.removesuffix("_passive"), "method": method, "paths": main_paths,
                                  "tiny": tiny}, PASSIVE if kind == "ours_passive" else None)
                kind_runs.append(res)
                log(f"  round {rnd} {kind}: {res['time_s']:.3f} s, peak RSS {fmt_mb(res['peak_rss_bytes'])} "
                    f"(floor {fmt_mb(res['rss_after_warmup_bytes'])})")
        log(f"  verify ({len(verify_names)} tensors)")
        verify = run_worker({"kind": "verify", "method": method, "paths": main_paths, "tiny": tiny,
                             "names": verify_names})
        o, b, op = summarise(runs["ours"]), summarise(runs["baseline"]), summarise(runs["ours_passive"])
        cases[method] = {
            "n_experts": n_main, "total_nnz": sum(nnz[:n_main]), "ours": o, "baseline": b,
            "time_ratio_median": o["median_s"] / b["median_s"], "time_ratio_min": o["min_s"] / b["min_s"],
            "speedup_median": b["median_s"] / o["median_s"],
            "peak_rss_ratio": o["peak_rss_bytes_median"] / b["peak_rss_bytes_median"],
            "net_peak_rss_ratio": o["net_peak_rss_bytes_median"] / b["net_peak_rss_bytes_median"],
            "verify": verify, "ours_omp_wait_passive": op,
            "ours_passive_vs_ours_default_median": op["median_s"] / o["median_s"],
            "ours_call": f"compeft.merge([compeft.open(p) for p in paths], method={method!r}, weights=[1.0]*N, lam=1.0)",
            "baseline_call": ("per expert: {k: v.float() for k, v in compeft.open(p).state_dict().items()}; then per "
                              f"tensor peft.utils.merge_utils.{method}(list_of_N, torch.ones(N)"
                              + (", density=1.0, majority_sign_method='total')" if method == "ties" else ")")),
        }

    if "scaling" in wanted:
        log(f"case scaling: ties, N in {scaling_ns}, {args.rounds} rounds")
        sruns: dict[int, list[dict[str, Any]]] = {n: [] for n in scaling_ns}
        for rnd in range(args.rounds):
            for n in scaling_ns:
                res = run_worker({"kind": "ours", "method": "ties", "paths": paths[:n], "tiny": tiny})
                sruns[n].append(res)
                log(f"  round {rnd} N={n}: {res['time_s']:.3f} s, peak RSS {fmt_mb(res['peak_rss_bytes'])}")
        points = []
        for n in scaling_ns:
            s = summarise(sruns[n])
            total = sum(nnz[:n])
            points.append({"n_experts": n, "total_nnz": total, "median_s": s["median_s"], "min_s": s["min_s"],
                           "ns_per_kept_entry": s["median_s"] / total * 1e9, "times_s": s["times_s"],
                           "peak_rss_bytes_median": s["peak_rss_bytes_median"],
                           "net_peak_rss_bytes_median": s["net_peak_rss_bytes_median"], "runs": s["runs"]})
        largest = points[-1]
        for p in points:
            p["per_entry_vs_largest"] = p["ns_per_kept_entry"] / largest["ns_per_kept_entry"]
        fit = linear_fit([p["total_nnz"] for p in points], [p["median_s"] for p in points])
        cases["scaling"] = {"method": "ties", "largest_n": largest["n_experts"], "points": points, "linear_fit": fit}
    if "mergekit" in wanted:
        cases["mergekit"] = mergekit_case(work / "mergekit", args.quick, n_main, args.seed, density, args.rounds, log)
    log("done")

    for method in ("ties", "task_arithmetic") if "peft" in wanted else ():
        v = cases[method]["verify"]
        if not v["all_close"]:
            bad = [k for k, x in v["checks"].items() if not x["assert_close"]]
            notes.append(f"{method}: outputs differ from PEFT's beyond assert_close on {bad}")
    if "scaling" in wanted and fit["intercept_s"] > 0.1 * points[0]["median_s"]:
        notes.append(f"scaling: a fixed cost of ~{fit['intercept_s']:.3f} s per call does not depend on the kept "
                     "entries (per-parameter work: allocating and zeroing the accumulators, the final divide; and "
                     "the hand-offs between Numba's and torch's thread pools), so the per-entry time falls as N grows")

    if "mergekit" in wanted and not cases["mergekit"]["outputs"]["equal_within_bf16_rounding"]:
        notes.append("mergekit: the outputs differ by more than bf16 rounding")
    results = {"cases": cases}
    rows = build_table(results)
    record = {
        "schema": 1, "benchmark": "merge", "date_utc": date.isoformat(timespec="seconds"),
        "command": [sys.executable, *sys.argv], "mode": "quick" if args.quick else "full", "git": git,
        "machine": machine, "cases_run": sorted(wanted),
        "versions": {**versions(), **{k: importlib.metadata.version(k) for k in ("peft", "mergekit", "transformers")}},
        "numba_threads": numba.get_num_threads(), "torch_threads": torch.get_num_threads(),
        "thread_env": {k: os.environ.get(k) for k in ("NUMBA_THREADING_LAYER", "NUMBA_NUM_THREADS", "OMP_NUM_THREADS",
                                                      "OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "MKL_NUM_THREADS")},
        "data": {"experts": n_experts, "tensors_per_expert": tensors, "shape": list(shape), "dtype": "bfloat16",
                 "params_per_expert": params, "distribution": f"Student-t(df={df}) * {scale}",
                 "generator": "numpy.random.default_rng([seed, expert, tensor])", "seed": args.seed,
                 "density": density, "nnz_per_expert": nnz, "file_bytes_per_expert": file_bytes,
                 "compress_s_per_expert_single_run": compress_s},
        "rounds": args.rounds, "verify_tensors": verify_names,
        "method": ("each timed call in its own process: imports (torch, numba, compeft.merging, and PEFT's "
                   "merge_utils.py loaded standalone, in both kinds), a warm-up on two tiny 2x64x64 experts, "
                   "gc.collect(), then one timed call; peak RSS = ru_maxrss at the end; floor = current RSS after "
                   "the warm-up (net = peak - floor). Ours and baseline "
                   "processes alternate, `rounds` each; reported median (and min)."),
        "results": results, "table": rows, "notes": notes,
        "total_wall_s": time.perf_counter() - started,
    }
    write_report(record, f"compeft merge benchmark ({record['mode']}): N experts x {params:,} params, density "
                 f"{density}, commit {git['short']}, {machine.get('cpu_model', '?')}, {machine['usable_cores']} cores, "
                 f"load {machine.get('loadavg_at_start')}", out_path)
    tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
