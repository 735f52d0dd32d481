#!/usr/bin/env python
"""compeft hot-swap benchmark: a 7B-class LoRA set swapped into a live PEFT adapter.

    python benchmarks/hotswap.py            # r=16 on q/k/v/o of 32 layers, hidden 4096 (128 modules, 16.8M params)
    python benchmarks/hotswap.py --quick    # 8 layers (smoke run)
    python benchmarks/hotswap.py --out results.json

The model is a skeleton shaped like a 7B Llama's attention: 32 layers of q/k/v/o ``nn.Linear(4096,
4096)`` in bf16 whose weights are one zero broadcast to 4096 × 4096 (a stride-0 view: PEFT reads
their shapes and dtype, nothing reads their values), so the 4.3 GB of base weights cost no memory
and the LoRA parameters (bf16, ``autocast_adapter_dtype=False``; the fp32 default of PEFT in a row of
its own) are real. Two adapters (Student-t(3) · 0.01 factors, lora_alpha 32) are swapped in turn so
every swap changes every weight.

Cases, interleaved in one process (so other jobs' noise falls on both), median of ``--repeats``:

1. ``compeft.integrations.peft.hotswap`` from a local ``.cpeft`` (density 0.1) against
   ``peft.utils.hotswap.hotswap_adapter`` from the dense safetensors adapter directory (page cache
   warm for both) — target <= 1.0;
2. ``hotswap`` from an ``http://`` URL served by ``tests/servers.py``'s ObjectServer paced to
   100 Mbit/s, against PEFT's ``hotswap_adapter`` of the dense directory fetched over the same link
   (PEFT takes no URL: fetch its two files, then swap) — target <= 0.2; PEFT from the local dense
   directory is reported next to it.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

import compeft
from compeft.integrations.peft import hotswap, load_adapter

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(REPO / "tests"))
from run import fmt_b, fmt_s, git_info, machine_info, table_row, versions, write_report  # noqa: E402
from servers import Pacer, object_server  # noqa: E402

LINK_BYTES_PER_S = 100e6 / 8  # 100 Mbit/s
DENSITY = 0.1
HIDDEN = 4096
RANK = 16
ALPHA = 32
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


class Attention(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        for name in TARGETS:
            linear = torch.nn.Linear(HIDDEN, HIDDEN, bias=False, device="meta")
            # one bf16 zero seen as 4096 x 4096: the shape and dtype PEFT reads, no memory
            linear.weight = torch.nn.Parameter(torch.zeros((), dtype=torch.bfloat16).expand(HIDDEN, HIDDEN),
                                               requires_grad=False)
            setattr(self, name, linear)


class Layer(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.self_attn = Attention()


class Inner(torch.nn.Module):
    def __init__(self, layers: int) -> None:
        super().__init__()
        self.layers = torch.nn.ModuleList(Layer() for _ in range(layers))


class Skeleton(torch.nn.Module):
    """``model.layers.{i}.self_attn.{q,k,v,o}_proj``, as in a Llama checkpoint."""

    def __init__(self, layers: int) -> None:
        super().__init__()
        self.model = Inner(layers)


def adapter_tensors(layers: int, seed: int) -> dict[str, torch.Tensor]:
    """PEFT-named bf16 lora_A/lora_B of q/k/v/o, Student-t(3) · 0.01, one generator per tensor."""
    out = {}
    for i in range(layers):
        for j, module in enumerate(TARGETS):
            for part, shape in (("lora_A", (RANK, HIDDEN)), ("lora_B", (HIDDEN, RANK))):
                rng = np.random.default_rng([seed, i, j, part == "lora_B"])
                x = rng.standard_t(3.0, size=shape).astype(np.float32) * np.float32(0.01)
                out[f"base_model.model.model.layers.{i}.self_attn.{module}.{part}.weight"] = \
                    torch.from_numpy(x).to(torch.bfloat16)
    return out


def write_adapter(directory: Path, tensors: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(directory / "adapter_model.safetensors"), {"format": "pt"})
    config = {"peft_type": "LORA", "r": RANK, "lora_alpha": ALPHA, "target_modules": TARGETS, "lora_dropout": 0.0,
              "bias": "none", "task_type": None, "base_model_name_or_path": None, "inference_mode": True}
    (directory / "adapter_config.json").write_text(json.dumps(config))


def timed(fn: Callable[[], Any]) -> float:
    gc.collect()
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def interleaved(cases: dict[str, Callable[[int], Any]], repeats: int) -> dict[str, dict[str, Any]]:
    """Each case called with the round number (alternating the two adapters), warm-up first."""
    for fn in cases.values():
        fn(0)
        fn(1)
    times: dict[str, list[float]] = {k: [] for k in cases}
    for k in range(repeats):
        for name, fn in cases.items():
            times[name].append(timed(lambda: fn(k)))
    return {name: {"median": statistics.median(t), "min": min(t), "times": t} for name, t in times.items()}


def live_model(layers: int, first: Path, fp32: bool) -> Any:
    from peft import PeftModel

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return PeftModel.from_pretrained(Skeleton(layers), str(first), autocast_adapter_dtype=fp32)


def check_equal(model: Any, tensors: dict[str, torch.Tensor], expert: compeft.CompressedExpert) -> bool:
    """After a swap the live adapter holds exactly the expert's decoded tensors."""
    params = dict(model.named_parameters())
    return all(torch.equal(params[n.replace(".weight", ".default.weight")].data, expert.to_dense(n).to(
        params[n.replace(".weight", ".default.weight")].dtype)) for n in tensors)


def main(argv: list[str] | None = None) -> int:
    from peft.utils.hotswap import hotswap_adapter

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="8 layers")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--torch-threads", type=int, help="torch.set_num_threads (on a loaded 2-core machine, torch's "
                        "parallel copies of 64k-entry LoRA tensors wait ms each for a descheduled thread)")
    parser.add_argument("--out", type=Path, help="JSON path (default benchmarks/results/<date>-<commit>-hotswap.json)")
    args = parser.parse_args(argv)
    layers = 8 if args.quick else 32
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    started = time.perf_counter()
    git = git_info()
    date = datetime.datetime.now(datetime.timezone.utc)
    suffix = ('-quick' if args.quick else '') + (f'-t{args.torch_threads}' if args.torch_threads else '')
    out_path = args.out or HERE / "results" / f"{date:%Y-%m-%d}-{git['short']}-hotswap{suffix}.json"

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - started:7.1f}s] {msg}", file=sys.stderr, flush=True)

    work = Path(tempfile.mkdtemp(prefix="compeft-hotswap-"))
    dense_dirs, experts, blobs, dense_bytes = [], [], [], 0
    for seed in (0, 1):
        tensors = adapter_tensors(layers, seed)
        write_adapter(work / f"dense{seed}", tensors)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            expert = compeft.compress(work / f"dense{seed}", density=DENSITY)
        expert.save(work / f"e{seed}.cpeft")
        dense_dirs.append(work / f"dense{seed}")
        experts.append(work / f"e{seed}.cpeft")
        blobs.append((work / f"e{seed}.cpeft").read_bytes())
        dense_bytes = sum(p.stat().st_size for p in (work / f"dense{seed}").iterdir())
    n = sum(t.numel() for t in tensors.values())
    log(f"{len(tensors)} tensors, {n:,} params; expert {len(blobs[0]):,} B, dense directory {dense_bytes:,} B")

    results: dict[str, Any] = {}
    for label, fp32 in (("bf16", False), ("fp32", True)):
        ours_model = live_model(layers, dense_dirs[0], fp32)
        peft_model = live_model(layers, dense_dirs[0], fp32)
        pointers = {k: p.data_ptr() for k, p in ours_model.named_parameters()}
        log(f"case 1 ({label} adapter parameters): local .cpeft vs PEFT hotswap_adapter from the dense directory")
        results[f"local_{label}"] = interleaved({
            "ours": lambda k: hotswap(ours_model, experts[k % 2], "default"),
            "peft": lambda k: hotswap_adapter(peft_model, str(dense_dirs[k % 2]), "default", torch_device="cpu"),
        }, args.repeats)
        hotswap(ours_model, experts[1], "default")
        results[f"local_{label}"]["exact"] = check_equal(ours_model, tensors, compeft.open(experts[1]))
        results[f"local_{label}"]["same_storage"] = pointers == {k: p.data_ptr() for k, p in ours_model.named_parameters()}
        r = results[f"local_{label}"]
        r["ratio_median"] = r["ours"]["median"] / r["peft"]["median"]
        log(f"  ours {r['ours']['median']:.4f} s, PEFT {r['peft']['median']:.4f} s, ratio {r['ratio_median']:.3f}")

    log("case 2: over a 100 Mbit/s paced loopback link")
    ours_model = live_model(layers, dense_dirs[0], False)
    peft_model = live_model(layers, dense_dirs[0], False)
    with object_server() as server:
        urls = [server.put(f"e{i}.cpeft", blob) for i, blob in enumerate(blobs)]
        dense_urls = [{f: server.put(f"dense{i}/{f}", (dense_dirs[i] / f).read_bytes())
                       for f in ("adapter_model.safetensors", "adapter_config.json")} for i in (0, 1)]
        server.pacer = Pacer(LINK_BYTES_PER_S)

        def peft_over_link(k: int) -> None:
            import fsspec

            fs = fsspec.filesystem("http")
            target = work / f"fetched{k % 2}"
            target.mkdir(exist_ok=True)
            for name, url in dense_urls[k % 2].items():
                (target / name).write_bytes(fs.cat_file(url))
            hotswap_adapter(peft_model, str(target), "default", torch_device="cpu")

        results["url"] = interleaved({
            "ours": lambda k: hotswap(ours_model, urls[k % 2], "default"),
            "peft_fetched": peft_over_link,
            "peft_local": lambda k: hotswap_adapter(peft_model, str(dense_dirs[k % 2]), "default",
                                                    torch_device="cpu"),
        }, args.repeats)
    r = results["url"]
    r["ratio_median"] = r["ours"]["median"] / r["peft_fetched"]["median"]
    r["ratio_vs_local_median"] = r["ours"]["median"] / r["peft_local"]["median"]
    r["transfer_floor_s"] = {"expert": len(blobs[0]) / LINK_BYTES_PER_S, "dense": dense_bytes / LINK_BYTES_PER_S}
    log(f"  ours {r['ours']['median']:.4f} s, PEFT fetched {r['peft_fetched']['median']:.4f} s, "
        f"PEFT local {r['peft_local']['median']:.4f} s")

    rows = []
    for label in ("bf16", "fp32"):
        c = results[f"local_{label}"]
        rows.append(table_row(f"1 hotswap local .cpeft vs PEFT dense dir ({label} adapter)", fmt_s(c["ours"]["median"]),
                              fmt_s(c["peft"]["median"]), c["ratio_median"], 1.0 if label == "bf16" else None))
    rows.append(table_row("2 hotswap URL @100 Mbit/s vs PEFT dense dir over the link", fmt_s(r["ours"]["median"]),
                          fmt_s(r["peft_fetched"]["median"]), r["ratio_median"], 0.2))
    rows.append(table_row("2 hotswap URL @100 Mbit/s vs PEFT dense dir local", fmt_s(r["ours"]["median"]),
                          fmt_s(r["peft_local"]["median"]), r["ratio_vs_local_median"], None))
    rows.append(table_row("size: expert vs dense adapter directory", fmt_b(len(blobs[0])), fmt_b(dense_bytes),
                          len(blobs[0]) / dense_bytes, None))
    notes = [f"case 2: the link alone takes {r['transfer_floor_s']['expert']:.3f} s for the expert and "
             f"{r['transfer_floor_s']['dense']:.3f} s for the dense directory",
             "ours decodes into the live parameters (same storage after every swap: "
             f"{all(results[f'local_{x}']['same_storage'] for x in ('bf16', 'fp32'))}; exact: "
             f"{all(results[f'local_{x}']['exact'] for x in ('bf16', 'fp32'))}); every swap reads and verifies "
             "every payload (CRC + a decode pass without output) before the first write"]
    record = {"schema": 1, "benchmark": "hotswap", "date_utc": date.isoformat(timespec="seconds"),
              "command": [sys.executable, *sys.argv], "mode": "quick" if args.quick else "full", "git": git,
              "machine": machine_info(), "versions": versions(), "torch_threads": torch.get_num_threads(),
              "data": {"layers": layers, "modules": TARGETS, "hidden": HIDDEN, "rank": RANK, "lora_alpha": ALPHA,
                       "tensors": len(tensors), "params": n, "density": DENSITY, "expert_bytes": len(blobs[0]),
                       "dense_directory_bytes": dense_bytes, "distribution": "Student-t(3) * 0.01, bf16"},
              "repeats": args.repeats, "results": results, "table": rows, "notes": notes,
              "total_wall_s": time.perf_counter() - started}
    write_report(record, f"compeft hotswap benchmark ({record['mode']}): {len(tensors)} tensors, {n:,} params, "
                         f"commit {git['short']}", out_path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
