#!/usr/bin/env python
"""compeft merge benchmark: compeft.merge from compressed streams vs decompress-then-merge with PEFT.

    python benchmarks/merge.py            # full: experts of 24 x 4096x1024 bf16 (100.7M params each)
    python benchmarks/merge.py --quick    # smoke run: experts of 8 x 1024x1024 (8.4M params each)
    python benchmarks/merge.py --out results.json

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
# parent


def run_worker(spec: dict[str, Any], env: dict[str, str] | None = None) -> dict[str, Any]:
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec)],
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
        c = r["cases"][method]
        o, b = c["ours"], c["baseline"]
        n = c["n_experts"]
        add(f"{i} {method} N={n} time vs decompress + peft {method}", fmt_s(o["median_s"]), fmt_s(b["median_s"]),
            c["time_ratio_median"], 0.1)
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
    s = r["cases"]["scaling"]
    for point in s["points"]:
        add(f"3 ties scaling N={point['n_experts']:>2} ({point['total_nnz']:,} kept; peak RSS "
            f"{fmt_mb(point['peak_rss_bytes_median'])}): ns per kept entry, vs N={s['largest_n']}",
            fmt_s(point["median_s"]), f"{point['ns_per_kept_entry']:.2f} ns", point["per_entry_vs_largest"], None)
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
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return 0

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
        f"{date:%Y-%m-%d}-{git['short']}-merge{'-quick' if args.quick else ''}.json")
    params = tensors * shape[0] * shape[1]
    notes: list[str] = []

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - started:7.1f}s] {msg}", file=sys.stderr, flush=True)

    tmp = tempfile.TemporaryDirectory(prefix="compeft-merge-bench-", dir=args.workdir)
    work = Path(tmp.name)
    log(f"generating and compressing {n_experts} experts of {tensors} x {shape[0]}x{shape[1]} bf16 "
        f"({params:,} params each), Student-t(df={df}) x {scale}, density {density}")
    paths: list[str] = []
    nnz: list[int] = []
    file_bytes: list[int] = []
    compress_s: list[float] = []
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
    tiny: list[str] = []
    for i in range(2):  # the warm-up experts: 2 tensors of 64x64
        path = work / f"tiny-{i}.cpeft"
        compeft.compress(make_expert(args.seed + 1, i, 2, (64, 64), df, scale), density=density).save(path)
        tiny.append(str(path))
    names = compeft.open(paths[0]).names
    verify_names = names if args.quick else [names[0], names[len(names) // 3], names[2 * len(names) // 3], names[-1]]

    cases: dict[str, Any] = {}
    for method in ("ties", "task_arithmetic"):
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
    log("done")

    for method in ("ties", "task_arithmetic"):
        v = cases[method]["verify"]
        if not v["all_close"]:
            bad = [k for k, x in v["checks"].items() if not x["assert_close"]]
            notes.append(f"{method}: outputs differ from PEFT's beyond assert_close on {bad}")
    if fit["intercept_s"] > 0.1 * points[0]["median_s"]:
        notes.append(f"scaling: a fixed cost of ~{fit['intercept_s']:.3f} s per call does not depend on the kept "
                     "entries (per-parameter work: allocating and zeroing the accumulators, the final divide; and "
                     "the hand-offs between Numba's and torch's thread pools), so the per-entry time falls as N grows")

    results = {"cases": cases}
    rows = build_table(results)
    record = {
        "schema": 1, "benchmark": "merge", "date_utc": date.isoformat(timespec="seconds"),
        "command": [sys.executable, *sys.argv], "mode": "quick" if args.quick else "full", "git": git,
        "machine": machine, "versions": {**versions(), "peft": importlib.metadata.version("peft")},
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
