#!/usr/bin/env python
"""compeft kernel benchmark: the codec's per-chunk kernels alone, on one thread.

    python benchmarks/codec_kernels.py            # the 160M-parameter LoRA set of run.py at k = 0.1
    python benchmarks/codec_kernels.py --quick    # 2 layers

Every (tensor, chunk) pair of the file goes through one kernel in a plain compiled loop: no
parallel region, no Python per tensor, no file reading. So the figures are the walk's own cost per
kept entry, which run.py's end-to-end cases (2w, 3w, 7) hide behind threads and Python. Kernels:

- ``walk``: ``kernels.check_chunk``, the decode walk with no output (its verdict only);
- ``tally``: ``kernels.tally_chunk``, the check pass ``CompressedExpert.payloads(check=True)`` runs;
- ``dense``: ``kernels.dense_chunk``, the walk writing every output element (zeros and entries);
- ``scatter``: ``kernels.scatter_chunk``, the walk writing the kept entries only;
- reference ``zero``: zeroing the same outputs in the same kind of loop (the memory write a dense
  decode cannot avoid).

Each is timed ``--repeats`` times after a warm-up, interleaved, and reported as the minimum (the
least disturbed run on a shared machine) and the median, in ms and ns per kept entry. Writes
``benchmarks/results/<date>-<commit>-kernels.json``.
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numba
import numpy as np
import torch
from numba import njit

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import compeft  # noqa: E402
from compeft.codec import golomb, kernels  # noqa: E402
from compeft.codec.arrays import address_table, array_at  # noqa: E402
from compeft.dtypes import flat_bits  # noqa: E402
from run import MAIN_DENSITY, REPO, git_info, lora_set, machine_info, table_row, versions, write_report  # noqa: E402


def over_chunks(kernel):  # type: ignore[no-untyped-def]
    """A compiled loop of ``kernel(words, row, chunk)`` over every (tensor, chunk) of ``work``:
    the number of chunks it did not find OK."""
    @njit
    def run(words, params, work):  # type: ignore[no-untyped-def]
        bad = 0
        for j in range(work.shape[0]):
            bad += kernel(words, params[work[j, 0]], work[j, 1]) != kernels.OK
        return bad
    return run


def writing_over_chunks(kernel):  # type: ignore[no-untyped-def]
    """The same for ``kernel(words, row, chunk, out)``, tensor t writing ``outs``' array t."""
    @njit
    def run(words, params, work, outs, like):  # type: ignore[no-untyped-def]
        bad = 0
        for j in range(work.shape[0]):
            t = work[j, 0]
            bad += kernel(words, params[t], work[j, 1], array_at(outs, t, like)) != kernels.OK
        return bad
    return run


walk_all, tally_all = over_chunks(kernels.check_chunk), over_chunks(kernels.tally_chunk)
dense_all, scatter_all = writing_over_chunks(kernels.dense_chunk), writing_over_chunks(kernels.scatter_chunk)


@njit
def zero_all(outs, like):  # type: ignore[no-untyped-def]
    for t in range(outs.shape[0]):
        array_at(outs, t, like)[:] = 0
    return 0


def measure(path: Path, repeats: int) -> dict[str, Any]:
    expert = compeft.open(path)
    held = expert.tensors(None, check=True)
    names = [n for n, t in held.items() if t.streams is not None and t.streams.nnz]
    outs = {n: torch.zeros(held[n].shape, dtype=held[n].dtype) for n in names}
    jobs = [golomb.DecodeJob(held[n].streams, held[n].numel, flat_bits(outs[n]), n, *held[n].patterns())
            for n in names]
    words, params = golomb.pack([(j.streams, j.numel) for j in jobs], share=True)
    params[:, kernels.P_POSITIVE] = [j.positive for j in jobs]
    params[:, kernels.P_NEGATIVE] = [j.negative for j in jobs]
    work = golomb.chunk_work((params[:, kernels.P_UNARY] - params[:, kernels.P_TABLE]) // 3)
    dtype = jobs[0].out.dtype
    if any(j.out.dtype != dtype for j in jobs):
        raise SystemExit("the benchmark set mixes output dtypes")
    table = address_table([j.out for j in jobs], dtype, "output")
    like = np.empty(0, dtype=dtype)
    entries = int(sum(j.streams.nnz for j in jobs))
    runs: dict[str, Callable[[], int]] = {
        "walk": lambda: walk_all(words, params, work),
        "tally": lambda: tally_all(words, params, work),
        "dense": lambda: dense_all(words, params, work, table, like),
        "scatter": lambda: scatter_all(words, params, work, table, like),
        "zero": lambda: zero_all(table, like),
    }
    default = numba.get_num_threads()
    numba.set_num_threads(1)  # (the loops are serial; this also keeps numba's pool idle)
    try:
        for fn in runs.values():  # compile and warm up
            if fn():
                raise SystemExit("a kernel reported a corrupt chunk in a file compeft just wrote")
        times: dict[str, list[float]] = {k: [] for k in runs}
        for _ in range(repeats):
            for k, fn in runs.items():
                start = time.perf_counter()
                fn()
                times[k].append(time.perf_counter() - start)
    finally:
        numba.set_num_threads(default)
    # the dense decode must equal the public decoder's output (a benchmark that decodes garbage measures nothing)
    dense_all(words, params, work, table, like)
    reference = expert.state_dict(names)
    mismatched = [n for n in names if not torch.equal(outs[n], reference[n])]
    if mismatched:
        raise SystemExit(f"dense kernel loop disagrees with state_dict on {mismatched[:3]}")
    return {"tensors": len(names), "chunks": int(work.shape[0]), "kept_entries": entries,
            "output_bytes": int(sum(j.out.nbytes for j in jobs)), "repeats": repeats,
            "kernels": {k: {"min_s": min(ts), "median_s": statistics.median(ts), "times": ts,
                            "ns_per_entry_min": min(ts) * 1e9 / entries} for k, ts in times.items()}}


def build_table(r: dict[str, Any]) -> list[dict[str, str]]:
    k = r["kernels"]
    zero = k["zero"]["min_s"]
    rows = []
    for name in ("walk", "tally", "dense", "scatter"):
        x = k[name]
        rows.append(table_row(f"{name} kernel, one thread, every chunk (min of {r['repeats']}) vs zeroing the outputs",
                              f"{x['min_s'] * 1e3:.2f} ms", f"{zero * 1e3:.2f} ms", x["min_s"] / zero, None,
                              f"{x['ns_per_entry_min']:.2f} ns/entry"))
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="2 layers (~10M params)")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    git = git_info()
    date = datetime.datetime.now(datetime.timezone.utc)
    out_path = args.out or REPO / "benchmarks" / "results" / (
        f"{date:%Y-%m-%d}-{git['short']}-kernels{'-quick' if args.quick else ''}.json")
    mapping = lora_set(2 if args.quick else 32, 64, args.seed, 3.0, 0.01)
    with tempfile.TemporaryDirectory(prefix="compeft-kernels-") as tmp:
        path = Path(tmp) / "set.cpeft"
        compeft.compress(mapping, density=MAIN_DENSITY).save(path)
        del mapping
        results = measure(path, args.repeats)
    record = {"schema": 1, "date_utc": date.isoformat(timespec="seconds"), "command": [sys.executable, *sys.argv],
              "mode": "quick" if args.quick else "full", "git": git, "machine": machine_info(), "versions": versions(),
              "density": MAIN_DENSITY, "results": results, "notes": []}
    record["table"] = build_table(results)
    write_report(record, f"compeft kernels ({record['mode']}): {results['kept_entries']:,} kept entries, "
                 f"{results['chunks']:,} chunks, commit {git['short']}", out_path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
