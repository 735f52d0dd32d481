"""GPU benchmark (issue 7): load, decode throughput, apply / hot swap and merge on the lent GPU.

Every figure is a ratio against a reference timed in the same run on the same data:

* load: (host-to-device copy of the compressed words from pinned memory + decode into dense
  bf16) vs the host-to-device copy of the dense bf16 tensors from pinned memory;
* decode throughput: bytes of dense output written per second vs a device-to-device copy's
  bytes-written rate; a numba-cuda decoder (one thread per chunk, the CPU kernel's walk) on the
  same data shows why the Triton kernel decodes in tiles;
* apply / hot swap: adding into resident bf16 weights from the device-resident compressed bytes
  vs copying the dense bf16 delta to the device and adding it;
* merge of 8 experts: ``compeft.merge(device="cuda")`` vs the CPU compressed-domain merge and vs
  PEFT's ``merge_utils`` on the GPU over dense tensors already resident there.

Run on a CUDA machine: ``python benchmarks/gpu.py`` (``--quick`` for a small smoke run).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import compeft  # noqa: E402
from compeft.codec import golomb, kernels  # noqa: E402
from run import git_info, machine_info, table_row, versions, write_report  # noqa: E402

LLAMA_LAYER = {"q_proj": (4096, 4096), "k_proj": (4096, 4096), "v_proj": (4096, 4096), "o_proj": (4096, 4096),
               "gate_proj": (11008, 4096), "up_proj": (11008, 4096), "down_proj": (4096, 11008)}


def task_vector(params: float, seed: int, df: float = 3.0) -> dict[str, torch.Tensor]:
    """7B-shaped full-layer residuals (Student-t, bf16) with at least ``params`` parameters."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    out: dict[str, torch.Tensor] = {}
    total = 0
    layer = 0
    while total < params:
        for name, shape in LLAMA_LAYER.items():
            normal = torch.randn(shape, generator=gen, device="cuda")
            chi = torch.randn((df_int := int(df), *shape), generator=gen, device="cuda").square_().sum(0)
            t = normal / torch.sqrt(chi / df_int)
            out[f"model.layers.{layer}.{name}.weight"] = (t * 1e-3).to(torch.bfloat16).cpu()
            total += t.numel()
            if total >= params:
                break
        layer += 1
    return out


def gpu_times(fn: Callable[[], Any], repeats: int, warmup: int = 1) -> list[float]:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return times


def med(times: list[float]) -> float:
    return statistics.median(times)


def summary(times: list[float]) -> dict[str, float]:
    return {"median_s": med(times), "min_s": min(times), "repeats": len(times)}


def bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    view = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}[a.dtype]
    return a.dtype == b.dtype and torch.equal(a.view(view), b.view(view))


# ---------------------------------------------------------------------------------------------
# numba-cuda: the CPU kernel's walk, one thread per chunk (measured against the Triton kernel)

def numba_cuda_decoder(device_expert: Any) -> Callable[[torch.Tensor, np.ndarray], None] | None:
    if not hasattr(np, "row_stack"):  # numba-cuda still calls it; numpy 2.4+ removed it
        np.row_stack = np.vstack
    try:
        from numba import cuda
    except ImportError:
        return None
    from compeft.codec import triton_kernels as tk

    @cuda.jit
    def scatter(words, params, work, out, out_at):
        j = cuda.grid(1)
        if j >= work.shape[0]:
            return
        t = work[j, 0]
        c = work[j, 1]
        nnz = params[t, 0]
        m = params[t, 2]
        chunk = params[t, 3]
        table = params[t, kernels.P_TABLE]
        unary = params[t, kernels.P_UNARY]
        low = params[t, kernels.P_LOW]
        high = params[t, kernels.P_HIGH]
        signs = params[t, kernels.P_SIGNS]
        width = params[t, tk.G_WIDTH]
        cut = params[t, tk.G_CUT]
        half = params[t, tk.G_HALF]
        base = words[table + 3 * c]
        qpos = words[table + 3 * c + 1]
        hpos = words[table + 3 * c + 2]
        first = c * chunk
        count = min(chunk, nnz - first)
        mask = (1 << width) - 1
        wi = qpos >> 6
        word = np.uint64(words[unary + wi]) & (np.uint64(0xFFFFFFFFFFFFFFFF) << np.uint64(qpos & 63))
        last_one = qpos - 1
        nxt = base
        o = out_at[t]
        for i in range(count):
            while word == 0:
                wi += 1
                word = np.uint64(words[unary + wi])
            one = (wi << 6) + cuda.ffs(word) - 1
            word &= word - np.uint64(1)
            q = one - last_one - 1
            last_one = one
            r = 0
            if m > 1:
                x = 0
                if width > 0:
                    lpos = (first + i) * width
                    lw = lpos >> 6
                    off = lpos & 63
                    x = np.int64(np.uint64(words[low + lw]) >> np.uint64(off))
                    if off + width > 64:
                        x |= np.int64(np.uint64(words[low + lw + 1]) << np.uint64(64 - off))
                    x &= mask
                r = x
                if x >= cut:
                    r += np.int64((np.uint64(words[high + (hpos >> 6)]) >> np.uint64(hpos & 63)) & np.uint64(1)) * half
                    hpos += 1
            pos = nxt + q * m + r
            nxt = pos + 1
            e = first + i
            neg = (np.uint64(words[signs + (e >> 6)]) >> np.uint64(e & 63)) & np.uint64(1)
            out[o + pos] = params[t, 7] if neg else params[t, 6]

    def run(flat: torch.Tensor, params: np.ndarray, work: np.ndarray, offsets: np.ndarray) -> None:
        threads = 128
        on_gpu = [torch.from_numpy(a).cuda() for a in (params, work, offsets)]  # numba's to_device needs old numpy
        scatter[(work.shape[0] + threads - 1) // threads, threads](
            cuda.as_cuda_array(device_expert.words), *(cuda.as_cuda_array(a) for a in on_gpu[:2]),
            cuda.as_cuda_array(flat.view(torch.int16)), cuda.as_cuda_array(on_gpu[2]))

    return run


# ---------------------------------------------------------------------------------------------

def case_load(expert: compeft.CompressedExpert, dense: dict[str, torch.Tensor], repeats: int,
              sweep_configs: list[tuple[int, int]]) -> dict[str, Any]:
    numel = sum(t.numel() for t in dense.values())
    pinned_dense = torch.empty(numel, dtype=torch.bfloat16).pin_memory()
    start = 0
    for t in dense.values():
        pinned_dense[start:start + t.numel()].copy_(t.reshape(-1))
        start += t.numel()
    on_gpu = torch.empty_like(pinned_dense, device="cuda")
    t_dense = gpu_times(lambda: on_gpu.copy_(pinned_dense, non_blocking=True), repeats)

    t0 = time.perf_counter()
    dev = expert.to_device("cuda")
    dev.executor.check()
    torch.cuda.synchronize()
    first_to_device = time.perf_counter() - t0
    pinned_words = dev.executor.words.cpu().pin_memory()

    def load() -> dict[str, torch.Tensor]:
        dev.executor.words.copy_(pinned_words, non_blocking=True)
        return dev.state_dict()

    t_load = gpu_times(load, repeats)
    t_h2d = gpu_times(lambda: dev.executor.words.copy_(pinned_words, non_blocking=True), repeats)
    t_decode = gpu_times(dev.state_dict, repeats)
    t_zero = gpu_times(lambda: torch.zeros(numel, dtype=torch.bfloat16, device="cuda"), repeats)
    t_d2d = gpu_times(lambda: on_gpu.clone(), repeats)

    decoded = dev.state_dict()
    cpu = expert.state_dict()
    identical = all(bits_equal(decoded[n].cpu(), cpu[n]) for n in cpu)
    del cpu

    numba_record: dict[str, Any] = {"available": False}
    runner = numba_cuda_decoder(dev)
    if runner is not None:
        from compeft.codec import triton_kernels as tk
        names = [n for n in dev.executor.names if dev.executor.rows.get(n, -1) >= 0]
        params = dev.executor.params[[dev.executor.rows[n] for n in names]].copy()
        sizes = np.array([expert.entry(n).numel for n in names], dtype=np.int64)
        offsets = np.cumsum(sizes) - sizes
        work = golomb.chunk_work(params[:, tk.G_CHUNKS])
        from compeft.dtypes import value_patterns
        for t, n in enumerate(names):
            params[t, 6], params[t, 7] = value_patterns(expert.entry(n).scale, torch.bfloat16)
        flat = torch.zeros(int(sizes.sum()), dtype=torch.bfloat16, device="cuda")
        try:
            runner(flat, params, work, offsets)
            same = all(bits_equal(flat[o:o + s].view(expert.entry(n).shape), decoded[n])
                       for n, o, s in zip(names, offsets, sizes))
            t_numba = gpu_times(lambda: (flat.zero_(), runner(flat, params, work, offsets)), repeats)
            numba_record = {"available": True, "identical_to_triton": same, **summary(t_numba)}
        except Exception as exc:  # a prototype: report why it did not run rather than stop the benchmark
            numba_record = {"available": True, "error": f"{type(exc).__name__}: {exc}"[:300]}
    sweep = []
    if sweep_configs:
        from compeft import gpu
        default = (gpu.BLOCK, gpu.NUM_WARPS)
        for block, warps in sweep_configs:
            gpu.BLOCK, gpu.NUM_WARPS = block, warps
            sweep.append({"block": block, "num_warps": warps, **summary(gpu_times(dev.state_dict, repeats))})
        gpu.BLOCK, gpu.NUM_WARPS = default
    out_bytes = 2 * numel
    return {
        "sweep": sweep,
        "params": numel, "kept": int(sum(expert.entry(n).nnz for n in expert.names)),
        "compressed_bytes_on_device": dev.nbytes, "dense_bytes": out_bytes,
        "h2d_dense": summary(t_dense), "load_compressed": summary(t_load), "h2d_compressed": summary(t_h2d),
        "decode": summary(t_decode), "zero_fill": summary(t_zero), "d2d_copy": summary(t_d2d),
        "load_ratio": med(t_load) / med(t_dense),
        "decode_write_rate_GBps": out_bytes / med(t_decode) / 1e9,
        "d2d_write_rate_GBps": out_bytes / med(t_d2d) / 1e9,
        "decode_vs_d2d_write_rate": (out_bytes / med(t_decode)) / (out_bytes / med(t_d2d)),
        "first_to_device_s": first_to_device, "identical_to_cpu": identical, "numba_cuda": numba_record,
    }


def case_apply(expert: compeft.CompressedExpert, dense: dict[str, torch.Tensor], repeats: int) -> dict[str, Any]:
    dev = expert.to_device("cuda")
    base = {n: torch.randn(t.shape, device="cuda").to(torch.bfloat16) for n, t in dense.items()}
    pinned = {n: t.pin_memory() for n, t in dense.items()}
    t_add = gpu_times(lambda: dev.add_into(base, 1e-3), repeats)

    def dense_add() -> None:
        for n, w in base.items():
            w.add_(pinned[n].to("cuda", non_blocking=True), alpha=1e-3)

    t_dense = gpu_times(dense_add, repeats)
    saved: list[Any] = []
    t_save = gpu_times(lambda: saved.append(dev.executor.save_entries(base)), repeats)
    t_restore = gpu_times(lambda: dev.executor.restore_entries(base, saved[-1]), repeats)
    before = {n: w.clone() for n, w in base.items()}
    undo = compeft.apply(expert, base, scale=0.5, restorable=True, check_base=False)
    undo.restore()
    exact = all(bits_equal(base[n], before[n]) for n in base)
    return {"add": summary(t_add), "dense_h2d_add": summary(t_dense), "ratio": med(t_add) / med(t_dense),
            "save": summary(t_save), "restore": summary(t_restore),
            "swap_ratio": (med(t_save) + med(t_add) + med(t_restore)) / med(t_dense), "restore_bit_exact": exact}


def case_merge(paths: list[Path], dense_experts: list[dict[str, torch.Tensor]], repeats: int) -> dict[str, Any]:
    from peft.utils import merge_utils

    resident = [{n: t.to("cuda") for n, t in d.items()} for d in dense_experts]
    pinned = [{n: t.pin_memory() for n, t in d.items()} for d in dense_experts]
    weights = [1.0] * len(paths)
    names = list(dense_experts[0])
    record: dict[str, Any] = {"experts": len(paths), "params_each": sum(t.numel() for t in dense_experts[0].values())}
    for method in ("task_arithmetic", "ties"):
        def ours() -> Any:
            return compeft.merge([compeft.open(p) for p in paths], method=method, check_base=False, device="cuda")

        def cpu() -> Any:
            return compeft.merge([compeft.open(p) for p in paths], method=method, check_base=False)

        def peft_gpu() -> Any:
            w = torch.tensor(weights, device="cuda")
            out = {}
            for n in names:
                tensors = [r[n] for r in resident]
                if method == "ties":
                    out[n] = merge_utils.ties(tensors, w, density=1.0, majority_sign_method="total")
                else:
                    out[n] = merge_utils.task_arithmetic(tensors, w)
            return out

        warm_experts = [compeft.open(p) for p in paths]
        for e in warm_experts:
            e.to_device("cuda")

        def ours_warm() -> Any:  # the experts' bytes already on the device
            return compeft.merge(warm_experts, method=method, check_base=False, device="cuda")

        def peft_gpu_h2d() -> Any:  # PEFT, the dense bf16 experts copied from pinned memory first
            for r, d in zip(resident, pinned):
                for n in names:
                    r[n].copy_(d[n], non_blocking=True)
            return peft_gpu()

        t_ours = gpu_times(ours, repeats)
        t_warm = gpu_times(ours_warm, repeats)
        t_peft = gpu_times(peft_gpu, repeats)
        t_peft_h2d = gpu_times(peft_gpu_h2d, repeats)
        t_cpu = gpu_times(cpu, max(1, repeats // 2))
        got, want = ours(), cpu()
        identical = all(torch.equal(got[n].cpu().view(torch.int32), want[n].view(torch.int32)) for n in want)
        record[method] = {"gpu": summary(t_ours), "gpu_warm": summary(t_warm), "cpu_compressed": summary(t_cpu),
                          "peft_gpu_dense": summary(t_peft), "peft_gpu_dense_h2d": summary(t_peft_h2d),
                          "vs_cpu": med(t_ours) / med(t_cpu), "vs_peft_gpu": med(t_ours) / med(t_peft),
                          "warm_vs_peft_gpu": med(t_warm) / med(t_peft),
                          "vs_peft_gpu_h2d": med(t_ours) / med(t_peft_h2d), "identical_to_cpu_merge": identical}
        del got, want
    return record


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=float, default=1.0e9, help="parameters of the load/apply expert")
    parser.add_argument("--merge-params", type=float, default=2.0e8, help="parameters of each merged expert")
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--density", type=float, default=0.1)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--quick", action="store_true", help="small sizes: a smoke run")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("no CUDA device: this benchmark runs on the lent GPU machine only")
        return 1
    if args.quick:
        args.params, args.merge_params, args.repeats = 6e7, 2e7, 3
    notes: list[str] = []
    work = Path(tempfile.mkdtemp(prefix="compeft-gpu-"))
    t0 = time.perf_counter()
    dense = task_vector(args.params, seed=0)
    expert = compeft.compress(dense, density=args.density)
    path = work / "big.cpeft"
    expert.save(path)
    notes.append(f"data: {sum(t.numel() for t in dense.values()) / 1e9:.2f}B bf16 Student-t params in "
                 f"{len(dense)} 7B-shaped tensors, density {args.density}, made in {time.perf_counter() - t0:.0f} s")
    record: dict[str, Any] = {"machine": machine_info(), "versions": versions(), "git": git_info(),
                              "device": torch.cuda.get_device_name(), "args": vars(args) | {"out": str(args.out)}}
    import triton
    record["versions"]["triton"] = triton.__version__
    configs = [] if args.quick else [(256, 2), (512, 2), (512, 4), (1024, 2), (1024, 4), (1024, 8), (2048, 4), (2048, 8), (4096, 8)]
    record["load"] = case_load(compeft.open(path), dense, args.repeats, configs)
    record["apply"] = case_apply(compeft.open(path), dense, args.repeats)
    del dense
    torch.cuda.empty_cache()
    paths, dense_experts = [], []
    for i in range(args.experts):
        d = task_vector(args.merge_params, seed=100 + i)
        p = work / f"e{i}.cpeft"
        compeft.compress(d, density=args.density).save(p)
        paths.append(p)
        dense_experts.append(d)
    record["merge"] = case_merge(paths, dense_experts, max(3, args.repeats // 2))

    L, A, M = record["load"], record["apply"], record["merge"]
    ms = lambda s: f"{s * 1e3:.2f} ms"  # noqa: E731
    rows = [
        table_row("load: H2D compressed + decode bf16", ms(L["load_compressed"]["median_s"]),
                  ms(L["h2d_dense"]["median_s"]) + " dense pinned H2D", L["load_ratio"], 0.2),
        table_row("decode: bytes-written rate vs D2D copy", f"{L['decode_write_rate_GBps']:.0f} GB/s",
                  f"{L['d2d_write_rate_GBps']:.0f} GB/s", 1 / L["decode_vs_d2d_write_rate"], 2.0,
                  info="" if L["decode_vs_d2d_write_rate"] >= 0.5 else "FAIL"),
        table_row("decode alone", ms(L["decode"]["median_s"]), ms(L["zero_fill"]["median_s"]) + " zero-fill", None,
                  None),
        table_row("apply (add into resident bf16)", ms(A["add"]["median_s"]), ms(A["dense_h2d_add"]["median_s"])
                  + " dense H2D + add", A["ratio"], None),
        table_row("hot swap (save + add + restore)", ms(A["save"]["median_s"] + A["add"]["median_s"]
                                                         + A["restore"]["median_s"]),
                  ms(A["dense_h2d_add"]["median_s"]) + " dense H2D + add", A["swap_ratio"], None),
    ]
    if L["numba_cuda"].get("median_s"):
        rows.append(table_row("numba-cuda thread-per-chunk decode", ms(L["numba_cuda"]["median_s"]),
                              ms(L["decode"]["median_s"]) + " Triton tiles",
                              L["numba_cuda"]["median_s"] / L["decode"]["median_s"], None))
    for method in ("task_arithmetic", "ties"):
        r = M[method]
        rows.append(table_row(f"merge {M['experts']}x {method} vs CPU", ms(r["gpu"]["median_s"]),
                              ms(r["cpu_compressed"]["median_s"]) + " CPU compressed", r["vs_cpu"], None))
        rows.append(table_row(f"merge {M['experts']}x {method} vs PEFT GPU", ms(r["gpu"]["median_s"]),
                              ms(r["peft_gpu_dense"]["median_s"]) + " PEFT dense GPU", r["vs_peft_gpu"], None))
        rows.append(table_row("  experts already on device", ms(r["gpu_warm"]["median_s"]),
                              ms(r["peft_gpu_dense"]["median_s"]) + " PEFT dense GPU", r["warm_vs_peft_gpu"], None))
        rows.append(table_row("  vs PEFT incl. dense H2D", ms(r["gpu"]["median_s"]),
                              ms(r["peft_gpu_dense_h2d"]["median_s"]) + " PEFT H2D+merge", r["vs_peft_gpu_h2d"],
                              None))
    notes.append(f"bit-identical to the CPU: decode {L['identical_to_cpu']}, restore {A['restore_bit_exact']}, "
                 f"merges {[M[m]['identical_to_cpu_merge'] for m in ('task_arithmetic', 'ties')]}")
    notes.append(f"first to_device (read + CRC + table check + pinned copy + device check): "
                 f"{L['first_to_device_s']:.2f} s")
    for row in L["sweep"]:
        notes.append(f"sweep BLOCK={row['block']} num_warps={row['num_warps']}: decode {ms(row['median_s'])}")
    record["table"] = rows
    record["notes"] = notes
    out = args.out or Path(__file__).resolve().parent / "results" / f"{time.strftime('%Y-%m-%d')}-gpu.json"
    write_report(record, f"compeft GPU benchmark on {record['device']}", out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
