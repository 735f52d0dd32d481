#!/usr/bin/env python
"""compeft remote benchmark: bytes moved and time to a loaded model over a loopback HTTP server.

    python benchmarks/remote.py            # full: the 7B-class LoRA set (448 tensors, r=64, ~160M params)
    python benchmarks/remote.py --quick    # smoke run: 8 layers, r=16 (112 tensors, ~10M params), < 1 min
    python benchmarks/remote.py --out results.json

Cases (see ``benchmarks/README.md``, "Remote benchmark"):

1. bytes the server sends to read one tensor of the expert (fresh ``compeft.open`` each time, every
   tensor in turn) against preamble + header + that tensor's payload (target <= 1.05); to read all
   tensors against the file size (target <= 1.01); a second open with a warm ``cache``;
2. time to get the expert into a loaded model (``open`` + ``apply`` into bf16 base weights) from a
   server pacing all its output together to 100 Mbit/s, against fetching the dense bf16
   safetensors adapter from the same server, ``safetensors.torch.load`` and adding it into the same
   weights; the time ratio is reported next to the size ratio it should approach.

The server is ``tests/servers.py``'s ObjectServer on 127.0.0.1 (it counts requests and body bytes).
"""

from __future__ import annotations

import argparse
import datetime
import gc
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

import compeft
from compeft import remote

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(REPO / "tests"))
from run import MODULES, fmt_b, fmt_s, git_info, lora_set, machine_info, table_row, versions, write_report  # noqa: E402
from servers import Pacer, object_server  # noqa: E402

LINK_BYTES_PER_S = 100e6 / 8  # 100 Mbit/s
DENSITY = 0.1


def case_bytes(server: Any, url: str, expert: compeft.CompressedExpert, cache: Path) -> dict[str, Any]:
    """Bytes and requests the server saw for: each tensor alone, everything, everything again from a cache."""
    header_bytes = expert.header.data_start
    ratios, requests = [], []
    for name in expert.names:
        server.reset_counts()
        compeft.open(url).to_dense(name)
        ratios.append(server.bytes_served / (header_bytes + expert.entry(name).length))
        requests.append(server.requests)
    median_index = sorted(range(len(ratios)), key=lambda i: expert.entry(expert.names[i]).length)[len(ratios) // 2]
    name = expert.names[median_index]
    server.reset_counts()
    compeft.open(url).to_dense(name)
    one = {"tensor": name, "payload_bytes": expert.entry(name).length, "header_bytes": header_bytes,
           "served_bytes": server.bytes_served, "requests": server.requests,
           "ratio": server.bytes_served / (header_bytes + expert.entry(name).length),
           "ratio_max_over_tensors": max(ratios), "ratio_median_over_tensors": statistics.median(ratios),
           "requests_max_over_tensors": max(requests)}
    server.reset_counts()
    compeft.open(url).state_dict()
    everything = {"file_bytes": expert.header.file_length, "served_bytes": server.bytes_served,
                  "requests": server.requests, "ratio": server.bytes_served / expert.header.file_length}
    compeft.open(url, cache=cache).state_dict()  # fill the cache
    server.reset_counts()
    compeft.open(url, cache=cache).state_dict()
    cached = {"served_bytes": server.bytes_served, "requests": server.requests,
              "methods": sorted({r.method for r in server.log})}
    return {"one_tensor": one, "all_tensors": everything, "warm_cache": cached}


def timed(fn: Callable[[], Any]) -> float:
    gc.collect()
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def case_time(expert_url: str, dense_url: str, base: dict[str, torch.Tensor], repeats: int) -> dict[str, Any]:
    """Seconds to bring the expert into ``base`` over the paced link, ours vs the dense adapter."""
    fs, dense_path = remote.resolve(dense_url)

    def ours() -> None:
        compeft.apply(compeft.open(expert_url), base, check_base=False)

    def dense() -> None:
        tensors = load_safetensors(fs.cat_file(dense_path))
        with torch.no_grad():
            for name, value in tensors.items():
                base[name].add_(value)

    ours()  # warm-up: Numba compiles or loads its cache, connections open
    dense()
    t_ours, t_dense = [], []
    for _ in range(repeats):  # interleaved, so that other jobs' noise falls on both
        t_ours.append(timed(ours))
        t_dense.append(timed(dense))
    return {"repeats": repeats, "ours": {"median": statistics.median(t_ours), "min": min(t_ours), "times": t_ours},
            "dense": {"median": statistics.median(t_dense), "min": min(t_dense), "times": t_dense},
            "ratio_median": statistics.median(t_ours) / statistics.median(t_dense)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="8 layers, r=16 (~10M params)")
    parser.add_argument("--out", type=Path, help="JSON path (default benchmarks/results/<date>-<commit>-remote.json)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    layers, rank = (8, 16) if args.quick else (32, 64)
    repeats = 3
    started = time.perf_counter()
    git = git_info()
    date = datetime.datetime.now(datetime.timezone.utc)
    out_path = args.out or HERE / "results" / f"{date:%Y-%m-%d}-{git['short']}-remote{'-quick' if args.quick else ''}.json"

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - started:7.1f}s] {msg}", file=sys.stderr, flush=True)

    log(f"generating {layers} layers x {len(MODULES)} modules, r={rank}, bf16")
    mapping = lora_set(layers, rank, args.seed, 3.0, 0.01)
    n = sum(t.numel() for t in mapping.values())
    expert = compeft.compress(mapping, density=DENSITY)
    blob = expert.to_bytes()
    dense_blob = save_safetensors(mapping)
    base = {k: torch.randn(v.shape, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
            for k, v in mapping.items()}
    log(f"{len(mapping)} tensors, {n:,} params; expert {len(blob):,} B, dense {len(dense_blob):,} B")
    import tempfile

    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="compeft-remote-") as cache, object_server() as server:
        url = server.put("expert.cpeft", blob)
        log("case 1: bytes moved")
        results["bytes"] = case_bytes(server, url, expert, Path(cache))
        log("case 2: time to a loaded model over a 100 Mbit/s link")
        server.pacer = Pacer(LINK_BYTES_PER_S)
        dense_url = server.put("adapter_model.safetensors", dense_blob)
        results["time"] = case_time(url, dense_url, base, repeats)
        results["time"]["size_ratio"] = len(blob) / len(dense_blob)
        results["time"]["ratio_over_size_ratio"] = results["time"]["ratio_median"] / results["time"]["size_ratio"]
        results["time"]["link_bytes_per_s"] = LINK_BYTES_PER_S
        results["time"]["transfer_floor_s"] = {"expert": len(blob) / LINK_BYTES_PER_S,
                                               "dense": len(dense_blob) / LINK_BYTES_PER_S}
    log("done")

    b, t = results["bytes"], results["time"]
    one, every, warm = b["one_tensor"], b["all_tensors"], b["warm_cache"]
    rows = [
        table_row(f"1 bytes: one tensor ({one['requests']} requests) vs header + payload",
                  fmt_b(one["served_bytes"]), fmt_b(one["header_bytes"] + one["payload_bytes"]), one["ratio"], 1.05),
        table_row(f"1 bytes: one tensor, worst of all {len(expert)}", "", "", one["ratio_max_over_tensors"], 1.05),
        table_row(f"1 bytes: all tensors ({every['requests']} requests) vs file size",
                  fmt_b(every["served_bytes"]), fmt_b(every["file_bytes"]), every["ratio"], 1.01),
        table_row(f"1 bytes: all tensors, warm cache ({'+'.join(warm['methods']) or 'no'} requests)",
                  fmt_b(warm["served_bytes"]), fmt_b(every["file_bytes"]), warm["served_bytes"] / every["file_bytes"],
                  None),
        table_row("2 time to loaded model @100 Mbit/s vs dense bf16 adapter", fmt_s(t["ours"]["median"]),
                  fmt_s(t["dense"]["median"]), t["ratio_median"], None),
        table_row("2 size ratio (expert / dense bf16 safetensors)", fmt_b(len(blob)), fmt_b(len(dense_blob)),
                  t["size_ratio"], None),
        table_row("2 time ratio / size ratio", "", "", t["ratio_over_size_ratio"], 1.25),
    ]
    notes = [f"case 2: at {LINK_BYTES_PER_S * 8 / 1e6:.0f} Mbit/s the transfer alone takes "
             f"{t['transfer_floor_s']['expert']:.3f} s for the expert and {t['transfer_floor_s']['dense']:.3f} s "
             "for the dense adapter; the rest is requests, decoding and adding."]
    record = {"schema": 1, "date_utc": date.isoformat(timespec="seconds"), "command": [sys.executable, *sys.argv],
              "mode": "quick" if args.quick else "full", "git": git, "machine": machine_info(), "versions": versions(),
              "data": {"layers": layers, "rank": rank, "tensors": len(mapping), "params": n, "density": DENSITY,
                       "expert_bytes": len(blob), "dense_bf16_safetensors_bytes": len(dense_blob)},
              "results": results, "table": rows, "notes": notes, "total_wall_s": time.perf_counter() - started}
    write_report(record, f"compeft remote benchmark ({record['mode']}): {len(mapping)} tensors, {n:,} params, "
                         f"commit {git['short']}", out_path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
