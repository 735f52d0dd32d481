#!/usr/bin/env python3
"""Crash safety at scale: SIGKILL compeft's writers at random moments and look at what is left.

Four operations, each run by the CLI (``compeft.cli.main``) in a loop inside a forked child that
alternates two outputs, so that a kill can land anywhere (computing, writing a shard, renaming,
sweeping): ``save`` (``compress … -o expert.cpeft``, two sources), ``decompress --base`` (two
experts onto one sharded base), ``merge --base`` (two methods) and ``library build`` (a fresh
library, then a rebuild over it). After each kill (the child's whole process group, Dask workers
included) the output must be absent or exactly one complete version (every file of it, byte for
byte), and nothing else may be beside it but the hidden temporaries a kill can leave: a
``.NAME.*.tmp`` file (only a kill between the two system calls that name and rename a finished
file) or a ``.NAME.*.partial`` stage directory (a directory output killed before it was renamed
into place), which the next write to the same output removes. The last step of each operation is a
run without a kill, after which no hidden entry may remain.

    python tools/crash_trials.py --trials 1000            # 250 per operation, a few minutes each 100
    python tools/crash_trials.py --trials 8 --ops save decompress

Prints a line per operation and a JSON summary; exits 1 on any partial file, mixed version,
disappeared output, unexpected file or stray left after a clean run. ``tests/test_crash_safety.py``
runs a handful of trials of each operation.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OPS = ("save", "decompress", "merge", "library")

SETUP = r"""
import json, sys
from pathlib import Path
import torch
from safetensors.torch import save_file
import compeft
work = Path(sys.argv[1])
g = torch.Generator().manual_seed(7)

def model(directory, tensors, config):
    directory.mkdir(parents=True)
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[:len(names) // 2],
              "model-00002-of-00002.safetensors": names[len(names) // 2:]}
    for shard, members in shards.items():
        save_file({n: tensors[n] for n in members}, directory / shard)
    (directory / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {n: s for s, members in shards.items() for n in members}}))
    (directory / "config.json").write_text(json.dumps(config))

base = {f"layers.{i}.weight": torch.randn(384, 384, generator=g) for i in range(6)}
model(work / "base", base, {"model_type": "tiny", "hidden": 384})
for k, name in enumerate(("tuned_a", "tuned_b")):
    model(work / name, {n: t + 0.02 * (k + 1) * torch.randn(t.shape, generator=g) for n, t in base.items()},
          {"model_type": "tiny", "hidden": 384, "variant": name})
    compeft.compress(work / name, base=work / "base", density=0.2).save(work / f"{name}.cpeft")
for name in ("math", "code", "poetry"):
    d = work / "adapters" / name
    d.mkdir(parents=True)
    save_file({f"base_model.model.layers.{i}.lora_A.weight": torch.randn(8, 384, generator=g) for i in range(3)},
              d / "adapter_model.safetensors")
    (d / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 8, "target_modules": ["layers"]}))
"""


def commands(work: Path, op: str) -> tuple[Path, list[list[str]]]:
    """The output and the two alternating command lines of ``op``."""
    out = work / "out" / op
    if op == "save":
        target = out / "expert.cpeft"
        return target, [["compress", str(work / t), "--base", str(work / "base"), "--density", "0.2", "-q", "-o",
                         str(target)] for t in ("tuned_a", "tuned_b")]
    if op == "decompress":
        target = out / "model"
        return target, [["decompress", str(work / f"{t}.cpeft"), "--base", str(work / "base"), "-q", "-o",
                         str(target)] for t in ("tuned_a", "tuned_b")]
    if op == "merge":
        target = out / "merged"
        return target, [["merge", str(work / "tuned_a.cpeft"), str(work / "tuned_b.cpeft"), "--method", m, "--base",
                         str(work / "base"), "-q", "-o", str(target)] for m in ("task_arithmetic", "ties")]
    target = out / "library"
    sources = [str(work / "adapters" / n) for n in ("math", "code", "poetry")]
    line = ["library", "build", *sources, "-o", str(target), "--workers", "1", "--density", "0.2", "-q"]
    return target, [line, line]


def snapshot(path: Path) -> dict[str, bytes] | None:
    """A file's bytes (key ""), a directory's files by relative name, or None when absent."""
    if not path.exists():
        return None
    if path.is_file():
        return {"": path.read_bytes()}
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def run_loop(argv_pair: list[list[str]], target: Path, op: str, log: Path, ready: int) -> None:
    """The child: one warm-up run into another directory (kernels loaded, nothing of ``target``
    touched), a byte on ``ready``, then the CLI again and again, alternating the two command lines
    (never returns). Without the warm-up a kill timed from the parent's measured run lands in the
    child's first-call costs, before anything is written."""
    from compeft.cli import main

    os.setpgid(0, 0)
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    warm = target.parent.parent.parent / "warm" / op / target.name
    shutil.rmtree(warm.parent, ignore_errors=True)
    main([str(warm) if a == str(target) else a for a in argv_pair[0]])
    os.write(ready, b"x")
    os.close(ready)
    i = 0
    while True:
        if op == "library" and i % 2 == 0:
            shutil.rmtree(target, ignore_errors=True)  # a fresh build, then one over it
        main(argv_pair[i % 2])
        i += 1


def classify(target: Path, versions: list[dict[str, bytes]], op: str) -> str:
    """What the kill left at ``target``: 'absent', 'complete', or a failure description."""
    found = snapshot(target)
    if found is None:
        return "absent"
    if op == "library":  # experts appear one by one (each complete), the catalog last
        full = versions[0]
        wrong = [n for n, data in found.items() if n not in full or full[n] != data]
        return "complete" if not wrong else f"FAIL partial or unexpected files {wrong[:3]}"
    if any(found == v for v in versions):
        return "complete"
    return f"FAIL neither version ({len(found)} files)"


def strays(target: Path) -> list[str]:
    """Hidden entries beside ``target`` (and, for a directory, inside it): temporaries and stages."""
    found = [p.name for p in target.parent.iterdir() if p.name != target.name]
    if target.is_dir():
        found += [str(p.relative_to(target)) for p in target.rglob(".*")]
    return found


def trials(work: Path, op: str, count: int, rng: random.Random, versions: list[dict[str, bytes]],
           period: float) -> dict[str, object]:
    target, argv_pair = commands(work, op)
    seen: Counter = Counter()
    stray_kinds: Counter = Counter()
    failures = []
    for trial in range(count):
        reader, writer = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: no return, no cleanup of the parent's state
            try:
                os.close(reader)
                run_loop(argv_pair, target, op, work / f"child-{op}.log", writer)
            finally:
                os._exit(0)
        os.close(writer)
        os.read(reader, 1)  # the child is warm (or died: then the read returns b"" and the kill finds nothing)
        os.close(reader)
        time.sleep(rng.uniform(0.0, 2.0 * period))
        for kill in (lambda: os.kill(pid, signal.SIGKILL), lambda: os.killpg(pid, signal.SIGKILL)):
            try:
                kill()
            except (ProcessLookupError, PermissionError):
                pass
        os.waitpid(pid, 0)
        time.sleep(0.05)
        try:
            os.killpg(pid, signal.SIGKILL)  # Dask workers spawned meanwhile
        except (ProcessLookupError, PermissionError):
            pass
        outcome = classify(target, versions, op)
        seen[outcome if not outcome.startswith("FAIL") else "FAIL"] += 1
        if outcome.startswith("FAIL"):
            failures.append(f"trial {trial}: {outcome}")
        for name in strays(target):
            kind = "stage" if name.endswith(".partial") else "tmp" if name.endswith(".tmp") else name
            stray_kinds[kind] += 1
            if kind not in ("stage", "tmp"):
                failures.append(f"trial {trial}: unexpected {name!r} beside the output")
    # a clean run (in a subprocess: this process forks again and must not have decoded): it must
    # sweep what the kills left
    code = subprocess.run([sys.executable, "-m", "compeft.cli", *argv_pair[0]], cwd=ROOT, env=_env()).returncode
    left = strays(target)
    if code != 0 or left:
        failures.append(f"after a clean run (exit {code}): {left}")
    if classify(target, versions, op) != "complete":
        failures.append("the clean run's output is not a complete version")
    return {"op": op, "trials": count, "outcomes": dict(seen), "hidden_left_by_kills": dict(stray_kinds),
            "left_after_clean_run": left, "failures": failures}


TIMED = r"""
import sys, time
from compeft.cli import main
import compeft, compeft.export, compeft.library.build  # what the trial's parent imports before forking
argv = sys.argv[1:]
started = time.perf_counter()
code = main(argv)
print(time.perf_counter() - started)
sys.exit(code)
"""


def references(work: Path, op: str) -> tuple[list[dict[str, bytes]], float]:
    """Each command line's complete output (run once, in a subprocess) and the time one run takes
    once compeft is imported."""
    target, argv_pair = commands(work, op)
    versions = []
    times = []
    for argv in argv_pair:
        shutil.rmtree(target.parent, ignore_errors=True)
        target.parent.mkdir(parents=True)
        proc = subprocess.run([sys.executable, "-c", TIMED, *argv], cwd=ROOT, env=_env(), capture_output=True,
                              text=True)
        if proc.returncode != 0:
            raise SystemExit(f"{op}: the reference run failed ({proc.returncode}): {proc.stderr[-2000:]}")
        times.append(float(proc.stdout.split()[-1]))
        versions.append(snapshot(target))
    shutil.rmtree(target.parent, ignore_errors=True)
    target.parent.mkdir(parents=True)
    if op == "library":
        assert versions[0] == versions[1], "library builds are not deterministic"
    else:
        assert versions[0] != versions[1], "the two versions must differ"
    return versions, sum(times) / len(times)


def _env() -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=40, help="trials in all, split evenly over the operations")
    parser.add_argument("--ops", nargs="+", choices=OPS, default=list(OPS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", type=Path, help="working directory (default: a temporary one, removed after)")
    parser.add_argument("--json", type=Path, help="also write the summary here")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    work = args.work or Path(tempfile.mkdtemp(prefix="compeft-crash-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        if not (work / "base").exists():
            subprocess.run([sys.executable, "-c", textwrap.dedent(SETUP), str(work)], cwd=ROOT, env=_env(), check=True)
        rng = random.Random(args.seed)
        per_op = max(1, args.trials // len(args.ops))
        results = []
        for op in args.ops:
            versions, period = references(work, op)
            # imported once, before the children fork, so that a child starts working at once (nothing is
            # decoded in this process: a child of a process that decoded under OpenMP must not decode)
            import compeft.cli  # noqa: F401
            import compeft.export  # noqa: F401
            import compeft.library.build  # noqa: F401
            started = time.perf_counter()
            result = trials(work, op, per_op, rng, versions, period)
            result["seconds"] = round(time.perf_counter() - started)
            results.append(result)
            print(f"{op}: {per_op} SIGKILLs at random moments (one run ≈ {period:.2f} s): {result['outcomes']}; "
                  f"hidden temporaries left by kills {result['hidden_left_by_kills'] or 'none'}, after a clean "
                  f"run {result['left_after_clean_run'] or 'none'}; failures {len(result['failures'])}", flush=True)
            for failure in result["failures"][:10]:
                print("   ", failure, flush=True)
        summary = {"trials": sum(r["trials"] for r in results), "ops": results,
                   "failures": sum(len(r["failures"]) for r in results)}
        print(json.dumps(summary, indent=1))
        if args.json:
            args.json.write_text(json.dumps(summary, indent=1))
        return 1 if summary["failures"] else 0
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
