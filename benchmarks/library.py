#!/usr/bin/env python
"""compeft library-build benchmark: ``compeft.build_library`` on Dask against a plain sequential loop.

    python benchmarks/library.py            # full: 50 LoRA experts of 4.2M parameters (32 layers x q/v, r=8), ~6 min
    python benchmarks/library.py --quick    # smoke run: 10 experts of 1M parameters (8 layers), ~1 min
    python benchmarks/library.py --out results.json

Cases, on the same adapter directories, scope "tensor", density 0.1, alpha 1 (see
``benchmarks/README.md``, "Library builds"):

1. the reference: ``compeft.compress(dir, ...).save(out/NAME.cpeft)`` in a loop in this process
   (Numba's default threads, warm);
2. ``compeft.build_library(glob, fresh_out, workers=1)`` (wall time includes the LocalCluster);
3. the same with ``workers=2``; 3b (counterfactual) the same with Dask's default
   ``MALLOC_TRIM_THRESHOLD_=65536`` left in the workers (build_library removes it);
4. the engine's fixed cost: a LocalCluster + Client of w worker processes started, ``import
   compeft.encode`` run on every worker (``client.run``), shut down; w = 1 and 2;
5. a resume: ``build_library`` again over case 3's output (every expert skipped after verifying).

Rounds interleave the cases (1, 2, 3, 3b, 5, 4(1), 4(2), then again) so that noise from other jobs falls
on all of them; medians and mins are reported. Every build must report N built and 0 failed (the
resume N skipped), and a sample of experts must decode to identical tensors from the library and
from the loop; otherwise the script exits non-zero.
"""

# Only the standard library at the top: Dask starts its workers with multiprocessing's "spawn",
# which imports this file as __mp_main__ in every worker. Heavy imports happen in main(), so a
# worker pays only for what build_library itself imports.
from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
DENSITY = 0.1
ALPHA = 1.0
SCOPE = "tensor"
CASES = ("sequential", "workers1", "workers2", "workers2_dasktrim", "resume2", "startup1", "startup2")
TRIM = "MALLOC_TRIM_THRESHOLD_"


def _import_on_worker() -> str | None:
    """The trivial task of case 4: what every library task needs before it can start. Returns the
    worker's MALLOC_TRIM_THRESHOLD_ (Dask's nanny sets it to 65536 by default)."""
    import compeft.encode  # noqa: F401
    return os.environ.get(TRIM, "unset")


@contextlib.contextmanager
def with_dask_malloc_trim() -> Any:
    """Case 3b (counterfactual): workers spawned with Dask's default MALLOC_TRIM_THRESHOLD_=65536,
    which build_library's local cluster removes (compeft.library.build.plain_worker_environment); the
    nanny also copies it into this process's os.environ, whence the restore."""
    from compeft.library import build as library
    saved = os.environ.get(TRIM)
    plain = library.plain_worker_environment
    library.plain_worker_environment = contextlib.nullcontext
    try:
        yield
    finally:
        library.plain_worker_environment = plain
        if saved is None:
            os.environ.pop(TRIM, None)
        else:
            os.environ[TRIM] = saved


def adapter_tensors(modules: list[tuple[int, str, int, int]], layers: int, rank: int, seed: int, df: float,
                    scale: float) -> dict[str, Any]:
    """PEFT-named lora_A/lora_B bf16 tensors for ``modules`` (index into run.MODULES, name, in, out),
    drawn exactly as run.lora_set draws them (same generator per (seed, layer, module, is_B))."""
    import numpy as np
    import torch
    out: dict[str, Any] = {}
    for i in range(layers):
        for j, module, fin, fout in modules:
            for part, shape in (("lora_A", (rank, fin)), ("lora_B", (fout, rank))):
                rng = np.random.default_rng([seed, i, j, part == "lora_B"])
                x = rng.standard_t(df, size=shape).astype(np.float32)
                x *= np.float32(scale)
                out[f"base_model.model.model.layers.{i}.{module}.{part}.weight"] = torch.from_numpy(x).to(torch.bfloat16)
    return out


def engine_startup(workers: int, env_seen: list[Any]) -> float:
    """Case 4: start a LocalCluster + Client of ``workers`` processes, import compeft.encode on each, stop."""
    from distributed import Client, LocalCluster
    gc.collect()
    start = time.perf_counter()
    with LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None) as cluster, \
            Client(cluster) as client:
        done = client.run(_import_on_worker)
        if len(done) != workers:
            raise SystemExit(f"FAIL: engine start-up ran on {len(done)} workers, expected {workers}")
    elapsed = time.perf_counter() - start
    env_seen.extend(done.values())
    return elapsed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="10 experts of 8 layers (~1M params each)")
    parser.add_argument("--out", type=Path, help="JSON path (default benchmarks/results/<date>-<commit>-library.json)")
    parser.add_argument("--experts", type=int, help="number of experts (default 50; --quick 10)")
    parser.add_argument("--rounds", type=int, help="interleaved rounds of every case (default 2)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", help="parent of the temporary directory (default: the system's)")
    args = parser.parse_args(argv)

    import numba
    import torch
    from safetensors.torch import save_file

    import compeft
    sys.path.insert(0, str(HERE))
    from run import (
        MODULES,
        fmt_s,
        git_info,
        machine_info,
        table_row,
        versions,
        write_report,
    )

    # LoRA r=8 on q_proj and v_proj of a 7B-class model: the LoRA paper's and PEFT's usual Llama set-up.
    modules = [(j, m, fin, fout) for j, (m, fin, fout) in enumerate(MODULES) if m in ("self_attn.q_proj", "self_attn.v_proj")]
    layers, rank = (8, 8) if args.quick else (32, 8)
    n_experts = args.experts or (10 if args.quick else 50)
    rounds = args.rounds or 2
    sample = sorted({0, n_experts // 3, (2 * n_experts) // 3, n_experts - 1})  # experts checked for identity
    df, scale = 3.0, 0.01
    started = time.perf_counter()
    git = git_info()
    date = datetime.datetime.now(datetime.timezone.utc)
    out_path = args.out or HERE / "results" / f"{date:%Y-%m-%d}-{git['short']}-library{'-quick' if args.quick else ''}.json"
    machine = machine_info()
    cores = os.cpu_count() or 1

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - started:6.1f}s] {msg}", file=sys.stderr, flush=True)

    tmp = tempfile.TemporaryDirectory(prefix="compeft-library-bench-", dir=args.workdir)
    work = Path(tmp.name)
    src = work / "src"
    names = [f"expert-{i:03d}" for i in range(n_experts)]
    config = {"peft_type": "LORA", "base_model_name_or_path": "llama-7b", "r": rank, "lora_alpha": 2 * rank,
              "target_modules": [m.rsplit(".", 1)[-1] for _, m, _, _ in modules], "task_type": "CAUSAL_LM"}
    log(f"generating {n_experts} adapters: {layers} layers x {len(modules)} modules, r={rank}, bf16 Student-t")
    params = tensors = adapter_bytes = 0
    for i, name in enumerate(names):
        mapping = adapter_tensors(modules, layers, rank, args.seed * 1_000_003 + i, df, scale)
        (src / name).mkdir(parents=True)
        save_file(mapping, str(src / name / "adapter_model.safetensors"))
        (src / name / "adapter_config.json").write_text(json.dumps(config))
        if i == 0:
            params = sum(t.numel() for t in mapping.values())
            tensors = len(mapping)
        adapter_bytes += (src / name / "adapter_model.safetensors").stat().st_size
        del mapping
    total_params = params * n_experts
    log(f"{n_experts} experts x {params:,} params ({tensors} tensors) = {total_params:,}; {adapter_bytes / 2**20:,.0f} MiB")
    glob = f"{src}/*/"
    gc.collect()
    gc.freeze()

    failures: list[str] = []

    def check(ok: bool, what: str) -> None:
        if not ok:
            failures.append(what)
            log(f"FAIL: {what}")

    # ---- the timed calls --------------------------------------------------------------------
    seq_split: list[dict[str, float]] = []

    def sequential(out: Path) -> None:
        out.mkdir(parents=True)
        t_compress = t_save = 0.0
        for name in names:
            t0 = time.perf_counter()
            expert = compeft.compress(str(src / name), density=DENSITY, alpha=ALPHA, scope=SCOPE)
            t1 = time.perf_counter()
            expert.save(out / f"{name}.cpeft")
            t_save += time.perf_counter() - t1
            t_compress += t1 - t0
            del expert
        seq_split.append({"compress_s": t_compress, "save_s": t_save})

    reports: dict[str, list[dict[str, Any]]] = {"workers1": [], "workers2": [], "workers2_dasktrim": [], "resume2": []}

    def build(case: str, out: Path, workers: int, *, resume: bool) -> None:
        report = compeft.build_library(glob, str(out), density=DENSITY, alpha=ALPHA, scope=SCOPE, workers=workers)
        reports[case].append({"seconds_inside": report.seconds, "workers": report.workers,
                              "built": len(report.built), "skipped": len(report.skipped), "failed": len(report.failed),
                              "bytes_read": report.bytes_read, "bytes_written": report.bytes_written,
                              "parameters": report.parameters})
        want = (0, n_experts) if resume else (n_experts, 0)
        check((len(report.built), len(report.skipped)) == want and not report.failed,
              f"{case}: built {len(report.built)}, skipped {len(report.skipped)}, failed {len(report.failed)} "
              f"(expected built {want[0]}, skipped {want[1]}, failed 0)"
              + (f"; first failure: {report.failed[0].reason[:200]}" if report.failed else ""))
        if not resume:
            check(report.parameters == total_params, f"{case}: report.parameters {report.parameters} != {total_params}")
            catalog = json.loads((out / "catalog.json").read_text())
            check(sorted(e["name"] for e in catalog["experts"]) == names, f"{case}: catalog does not list every expert")

    def timed(fn: Callable[[], Any]) -> float:
        gc.collect()
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start

    # ---- warm-up (untimed) ------------------------------------------------------------------
    log("warm-up: one compress in this process (Numba), one 2-expert build on 2 workers (imports, Numba cache)")
    compeft.compress(str(src / names[0]), density=DENSITY, alpha=ALPHA, scope=SCOPE).save(work / "warm.cpeft")
    warm = compeft.build_library([str(src / n) for n in names[:2]], str(work / "warm-lib"), density=DENSITY,
                                 alpha=ALPHA, scope=SCOPE, workers=2)
    check(len(warm.built) == 2 and not warm.failed, f"warm-up build: {len(warm.built)} built, {len(warm.failed)} failed")

    # ---- interleaved rounds -----------------------------------------------------------------
    times: dict[str, list[float]] = {c: [] for c in CASES}
    loadavg: list[list[float]] = []
    identity: dict[str, Any] = {}
    worker_env: list[Any] = []
    for r in range(rounds):
        loadavg.append(list(os.getloadavg()))
        outs = {c: work / f"round{r}-{c}" for c in ("sequential", "workers1", "workers2", "workers2_dasktrim")}
        times["sequential"].append(timed(lambda o=outs: sequential(o["sequential"])))
        log(f"round {r + 1}/{rounds}: sequential loop {times['sequential'][-1]:.2f} s")
        times["workers1"].append(timed(lambda o=outs: build("workers1", o["workers1"], 1, resume=False)))
        log(f"round {r + 1}/{rounds}: build workers=1 {times['workers1'][-1]:.2f} s")
        times["workers2"].append(timed(lambda o=outs: build("workers2", o["workers2"], 2, resume=False)))
        log(f"round {r + 1}/{rounds}: build workers=2 {times['workers2'][-1]:.2f} s")
        with with_dask_malloc_trim():
            times["workers2_dasktrim"].append(timed(lambda o=outs: build("workers2_dasktrim", o["workers2_dasktrim"], 2,
                                                                resume=False)))
        log(f"round {r + 1}/{rounds}: build workers=2, Dask's {TRIM}=65536 {times['workers2_dasktrim'][-1]:.2f} s")
        times["resume2"].append(timed(lambda o=outs: build("resume2", o["workers2"], 2, resume=True)))
        log(f"round {r + 1}/{rounds}: resume workers=2 {times['resume2'][-1]:.2f} s")
        times["startup1"].append(engine_startup(1, worker_env))
        times["startup2"].append(engine_startup(2, worker_env))
        log(f"round {r + 1}/{rounds}: engine start+stop {times['startup1'][-1]:.2f} s (1w), "
            f"{times['startup2'][-1]:.2f} s (2w)")
        if r == 0:  # untimed: the library's experts decode to the loop's tensors
            compared = 0
            for i in sample:
                ref = compeft.open(outs["sequential"] / f"{names[i]}.cpeft")
                ref_sd = ref.state_dict()
                for case in ("workers1", "workers2", "workers2_dasktrim"):
                    lib = compeft.open(outs[case] / f"{names[i]}.cpeft")
                    lib_sd = lib.state_dict()
                    same = (list(lib_sd) == list(ref_sd)
                            and all(lib_sd[k].dtype == v.dtype and torch.equal(lib_sd[k], v) for k, v in ref_sd.items()))
                    meta_lib = {k: v for k, v in lib.metadata.items() if k != "build"}
                    meta_ref = {k: v for k, v in ref.metadata.items() if k != "build"}
                    check(same, f"{case}: {names[i]} decodes to different tensors than the sequential loop's")
                    differ = sorted(k for k in {*meta_lib, *meta_ref} if meta_lib.get(k) != meta_ref.get(k))
                    check(not differ, f"{case}: {names[i]} metadata (build record aside) differs in {differ}")
                    check("build" in lib.metadata, f"{case}: {names[i]} has no build record")
                    compared += 1
                    del lib_sd
                del ref_sd
            identity = {"experts_compared": [names[i] for i in sample], "pairs_compared": compared,
                        "identical": not failures,
                        "how": "compeft.open(p).state_dict() of the library's file vs the loop's: same names, "
                               "dtypes and torch.equal values; metadata equal apart from 'build'"}
            log(f"round 1: {compared} library/loop pairs compared: {'identical' if not failures else 'DIFFERENT'}")
        for p in outs.values():
            shutil.rmtree(p)
    log("done")

    # ---- figures ----------------------------------------------------------------------------
    def summary(ts: list[float]) -> dict[str, Any]:
        return {"median": statistics.median(ts), "min": min(ts), "times": ts}

    res: dict[str, Any] = {c: summary(ts) for c, ts in times.items()}
    med = {c: res[c]["median"] for c in CASES}
    n = n_experts
    for c in ("sequential", "workers1", "workers2", "workers2_dasktrim"):
        res[c]["experts_per_min"] = 60 * n / med[c]
        res[c]["params_per_s"] = total_params / med[c]
        res[c]["s_per_expert"] = med[c] / n
    for w in (1, 2):
        c = f"workers{w}"
        res[c]["speedup_vs_sequential"] = med["sequential"] / med[c]
        res[c]["speedup_vs_sequential_per_round"] = [s / t for s, t in zip(times["sequential"], times[c])]
        res[c]["speedup_vs_sequential_min"] = res["sequential"]["min"] / res[c]["min"]
        steady = med[c] - med[f"startup{w}"]
        res[c]["steady_state"] = {"s": steady, "experts_per_min": 60 * n / steady, "params_per_s": total_params / steady,
                                  "speedup_vs_sequential": med["sequential"] / steady,
                                  "how": f"N / (median T_workers={w} - median T_startup({w}))"}
        res[c]["overhead_per_expert_s_excl_startup"] = (med[c] - med[f"startup{w}"] - med["sequential"]) / n
        res[c]["overhead_per_expert_s_incl_startup"] = (med[c] - med["sequential"]) / n
        res[c]["reports"] = reports[c]
    res["workers2_dasktrim"]["speedup_vs_sequential"] = med["sequential"] / med["workers2_dasktrim"]
    res["workers2_dasktrim"]["slowdown_vs_workers2"] = med["workers2_dasktrim"] / med["workers2"]
    res["workers2_dasktrim"]["reports"] = reports["workers2_dasktrim"]
    res["workers2_dasktrim"]["how"] = (f"build_library(workers=2) with Dask's default {TRIM}=65536 left in place "
                                       "(compeft removes it); not a case of the brief, a counterfactual")
    res["worker_malloc_trim_threshold_seen"] = sorted(set(map(str, worker_env)))
    res["resume2"]["s_per_expert"] = med["resume2"] / n
    res["resume2"]["s_per_expert_excl_startup"] = (med["resume2"] - med["startup2"]) / n
    res["resume2"]["ratio_vs_sequential_build"] = med["resume2"] / med["sequential"]
    res["resume2"]["reports"] = reports["resume2"]
    res["sequential"]["split"] = seq_split
    res["sequential"]["split_median_per_expert"] = {k: statistics.median(s[k] for s in seq_split) / n
                                                    for k in ("compress_s", "save_s")}

    def rate(c: str) -> str:
        return f"{res[c]['experts_per_min']:.1f} exp/min, {res[c]['params_per_s'] / 1e6:.1f} Mp/s"

    seq_pe = med["sequential"] / n
    rows = [
        table_row(f"1 sequential loop, {n} experts (reference; min {fmt_s(res['sequential']['min'])})",
                  fmt_s(med["sequential"]), "", None, None),
        table_row("1 sequential loop: throughput", rate("sequential"), "", None, None),
    ]
    for w in (1, 2):
        c = f"workers{w}"
        rows += [
            table_row(f"{w + 1} build_library workers={w}: wall vs loop (min {fmt_s(res[c]['min'])})", fmt_s(med[c]),
                      fmt_s(med["sequential"]), med[c] / med["sequential"], None),
            table_row(f"{w + 1} workers={w}: throughput; ratio = speed-up vs loop", rate(c), rate("sequential"),
                      res[c]["speedup_vs_sequential"], None),
        ]
    for w in (1, 2):
        c = f"workers{w}"
        rows.append(table_row(f"4 engine start+import+stop, {w} worker(s); ratio = share of build",
                              fmt_s(med[f"startup{w}"]), fmt_s(med[c]), med[f"startup{w}"] / med[c], None))
    for w in (1, 2):
        c = f"workers{w}"
        st = res[c]["steady_state"]
        rows.append(table_row(f"{w + 1} workers={w} steady state (excl. start-up); ratio = speed-up",
                              f"{st['experts_per_min']:.1f} exp/min, {st['params_per_s'] / 1e6:.1f} Mp/s",
                              rate("sequential"), st["speedup_vs_sequential"], None))
    rows.append(table_row(f"3b workers=2 with Dask's {TRIM}=65536 (counterfactual); ratio = speed-up",
                          rate("workers2_dasktrim"), rate("sequential"), res["workers2_dasktrim"]["speedup_vs_sequential"],
                          None))
    rows += [
        table_row("engine overhead/expert, 1w: (T_1w-T_start(1)-T_seq)/N vs loop s/expert",
                  fmt_s(res["workers1"]["overhead_per_expert_s_excl_startup"]), fmt_s(seq_pe),
                  res["workers1"]["overhead_per_expert_s_excl_startup"] / seq_pe, None),
        table_row("engine overhead/expert incl. start-up, 1w: (T_1w-T_seq)/N",
                  fmt_s(res["workers1"]["overhead_per_expert_s_incl_startup"]), fmt_s(seq_pe),
                  res["workers1"]["overhead_per_expert_s_incl_startup"] / seq_pe, None),
        table_row("5 resume of 2w output (all skipped): s/expert vs loop s/expert",
                  fmt_s(res["resume2"]["s_per_expert"]), fmt_s(seq_pe), res["resume2"]["s_per_expert"] / seq_pe, None),
        table_row("5 resume, excl. 2w start-up: s/expert",
                  fmt_s(res["resume2"]["s_per_expert_excl_startup"]), fmt_s(seq_pe),
                  res["resume2"]["s_per_expert_excl_startup"] / seq_pe, None),
        table_row(f"check: every build {n} built / 0 failed, resume {n} skipped ({4 * rounds + 1} builds)", "", "",
                  None, None, "FAIL" if any("built" in f for f in failures) else "pass"),
        table_row(f"check: decoded tensors library == loop ({len(sample)} experts x 3 builds)", "", "", None, None,
                  "pass" if identity.get("identical") else "FAIL"),
    ]
    split = res["sequential"]["split_median_per_expert"]
    notes = [
        (f"{n} experts x {params:,} parameters; medians of {rounds} interleaved rounds; machine load average at the "
        f"start of each round: {[round(x[0], 2) for x in loadavg]}."),
        (f"sequential loop per expert: compress {split['compress_s']:.4f} s + save {split['save_s']:.4f} s "
        f"(Numba threads {numba.get_num_threads()}, torch threads {torch.get_num_threads()} in this process); "
        f"build_library gives each task cores // workers = {cores} // w kernel threads."),
        ("workers=1 vs workers=2: speed-up of 2 worker processes with 1 kernel thread each over 1 worker with "
        f"{cores} threads = {med['workers1'] / med['workers2']:.3f} (wall), "
        f"{res['workers2']['steady_state']['experts_per_min'] / res['workers1']['steady_state']['experts_per_min']:.3f} "
        "(steady state)."),
        (f"workers of a plain LocalCluster (case 4) see {TRIM} = {res['worker_malloc_trim_threshold_seen']}. Case 3b, the same 2-worker build with "
        "Dask's default 65536 (glibc then returns freed memory at once, so every large temporary is a fresh mmap "
        f"that page-faults): {res['workers2_dasktrim']['slowdown_vs_workers2']:.2f}x the time of case 3."),
    ]
    record = {
        "schema": 1, "date_utc": date.isoformat(timespec="seconds"), "command": [sys.executable, *sys.argv],
        "mode": "quick" if args.quick else "full", "git": git, "machine": machine,
        "versions": {**versions(), "distributed": __import__("distributed").__version__,
                     "dask": __import__("dask").__version__},
        "numba_threads": numba.get_num_threads(), "torch_threads": torch.get_num_threads(),
        "thread_env": {k: os.environ.get(k) for k in ("NUMBA_THREADING_LAYER", "NUMBA_NUM_THREADS", "OMP_NUM_THREADS",
                                                      "OMP_WAIT_POLICY", "MKL_NUM_THREADS")},
        "data": {"experts": n, "layers": layers, "modules": [m for _, m, _, _ in modules], "rank": rank,
                 "dtype": "bfloat16", "distribution": f"Student-t(df={df}) * {scale}",
                 "seeds": f"run.lora_set's scheme, seed = {args.seed} * 1000003 + expert index", "tensors_per_expert": tensors,
                 "params_per_expert": params, "params_total": total_params, "adapter_bytes_total": adapter_bytes,
                 "layout": "one PEFT adapter dir per expert: adapter_config.json + adapter_model.safetensors"},
        "settings": {"density": DENSITY, "alpha": ALPHA, "scope": SCOPE, "rounds": rounds,
                     "round_order": list(CASES), "loadavg_per_round": loadavg},
        "results": res, "identity_check": identity, "failures": failures, "table": rows, "notes": notes,
        "total_wall_s": time.perf_counter() - started,
    }
    write_report(record, f"compeft library builds ({record['mode']}): {n} experts x {params:,} params, commit "
                 f"{git['short']}{' (compeft/ dirty)' if git['compeft_dirty'] else ''}, "
                 f"{machine.get('cpu_model', '?')}, {machine['usable_cores']} cores", out_path)
    tmp.cleanup()
    if failures:
        print("FAILED checks:\n  " + "\n  ".join(failures), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
