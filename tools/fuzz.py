#!/usr/bin/env python3
"""Coverage-guided fuzzing of compeft's readers with atheris (libFuzzer for Python).

Every input is a candidate ``.cpeft`` file. The target opens it from memory, summarises the header
(what ``compeft inspect`` prints), verifies it, decodes it, applies it onto a zero base and merges it
with itself. The only exceptions allowed out are :class:`compeft.CompeftError` subclasses; anything
else (an ``IndexError``, a ``MemoryError``, a crash inside a Numba kernel, a hang caught by
libFuzzer's ``-timeout``) is a finding. One oracle goes beyond "no crash": a file that passes
``verify()`` must also decode.

Random byte mutations almost never survive the header's CRC-32, so each input is run twice: as
given, and *repaired* — header CRC, payload CRCs and lengths recomputed around the mutated JSON —
so mutations of offsets, shapes, nnz and chunk tables reach the checks behind the checksums.

Usage (see tools/README.md)::

    python tools/fuzz.py --seconds 60                 # seeds from spec/vectors/, a fresh corpus dir
    python tools/fuzz.py --seconds 1200 --corpus fuzz-corpus -- -jobs=1 -rss_limit_mb=4096
    python tools/fuzz.py --replay crash-<sha1>        # re-run one input without atheris

It prints the number of inputs run, the corpus size and the findings, and exits 1 on a finding.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VECTORS = ROOT / "spec" / "vectors"

# Decoding allocates the outputs a file declares (a 1e12-element tensor of zeros has a valid, empty
# payload): the harness decodes only files whose outputs stay small; opening and verify() run always.
MAX_DECODE_ELEMENTS = 1 << 22


def seed_files() -> list[Path]:
    """Every committed vector, valid and invalid: the corpus starts from real structure."""
    return sorted(VECTORS.glob("*.cpeft")) + sorted((VECTORS / "invalid").glob("*.cpeft"))


def repair(data: bytes) -> bytes | None:
    """``data`` with the header CRC, every payload CRC, the header padding and ``file_length`` made
    consistent again, keeping the (mutated) JSON content; ``None`` when the JSON does not parse."""
    # Imported here, not at the top: surgery imports compeft.format.header, which the fuzzing child
    # must import only under atheris's instrumentation (_fuzz_child), or coverage would not see it.
    import surgery

    try:
        preamble, doc, body = surgery.split(data)
    except Exception:  # too short, or any malformed header: nothing to repair
        return None
    surgery.recrc_payloads(doc, body)
    try:
        return surgery.join(doc, body, preamble=preamble, allow_nan=True)  # deflated again if it was
    except (ValueError, RecursionError):
        return None


def exercise(data: bytes) -> None:
    """Open, inspect, verify, decode, apply and merge ``data``; only CompeftError may escape."""
    import torch

    from compeft import merge
    from compeft.applying import apply
    from compeft.errors import CompeftError
    from compeft.expert import CompressedExpert
    from compeft.format import BytesReader
    from compeft.report import describe
    from compeft.dtypes import DTYPE_TO_TORCH

    try:
        expert = CompressedExpert(BytesReader(data, "<fuzz>"))
    except CompeftError:
        return
    json.dumps(describe(expert.header))  # what `compeft inspect --json` prints
    try:
        expert.verify()
        verified = True
    except CompeftError:
        verified = False
    if sum(e.numel for e in expert.header.tensors) > MAX_DECODE_ELEMENTS:
        return
    try:
        decoded = expert.state_dict()
    except CompeftError as exc:
        if verified:  # verify() promises that decoding cannot fail afterwards
            raise AssertionError(f"verify() passed but decoding failed: {exc}") from exc
        return
    base = {name: torch.zeros(e.shape, dtype=DTYPE_TO_TORCH[e.dtype]) for name, e in expert.header.by_name.items()}
    try:
        apply(expert, base, scale=0.5, check_base=False)
    except CompeftError:
        pass
    for name, tensor in decoded.items():  # the same bytes decode the same way twice
        again = expert.to_dense(name)
        if not torch.equal(tensor.reshape(-1).view(torch.uint8), again.reshape(-1).view(torch.uint8)):
            raise AssertionError(f"tensor {name!r} decoded differently twice")
    for method in ("task_arithmetic", "ties"):
        try:
            merge([expert, expert], method=method, check_base=False)
        except CompeftError:
            pass


def test_one_input(data: bytes) -> None:
    exercise(data)
    fixed = repair(data)
    if fixed is not None and fixed != data:
        exercise(fixed)


def _fuzz_child() -> None:
    """Runs under atheris (the child process): instrument compeft, then hand control to libFuzzer."""
    import atheris

    # Numba compiles the kernels from their bytecode: instrumented bytecode does not compile, so the
    # kernels module is imported first, uninstrumented (its branches are native code anyway).
    import compeft.codec.encode_kernels  # noqa: F401
    import compeft.codec.floats  # noqa: F401
    import compeft.codec.kernels  # noqa: F401
    import compeft.codec.select_kernels  # noqa: F401
    with atheris.instrument_imports(include=["compeft"]):
        import compeft.applying  # noqa: F401 - imported for instrumentation
        import compeft.merging  # noqa: F401
        import compeft.report  # noqa: F401
    import numba  # noqa: F401 - warm the kernels once so the first inputs do not time out
    test_one_input((VECTORS / "small_chunks.cpeft").read_bytes())
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


def _stat(output: str, key: str) -> int | None:
    for line in output.splitlines():
        if line.startswith(f"stat::{key}:"):
            return int(line.split(":")[-1])
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=int, default=60, help="total fuzzing time (libFuzzer -max_total_time)")
    parser.add_argument("--corpus", type=Path, help="corpus directory, kept between runs (default: a temp dir)")
    parser.add_argument("--artifacts", type=Path, default=Path("."), help="where crash-* inputs are written")
    parser.add_argument("--replay", type=Path, nargs="+", help="run these inputs once, without atheris")
    parser.add_argument("libfuzzer", nargs="*", help="extra libFuzzer flags, after --")
    args = parser.parse_args(argv)

    sys.path.insert(0, str(ROOT))
    if args.replay:
        for path in args.replay:
            test_one_input(path.read_bytes())
            print(f"{path}: no finding")
        return 0

    temp = None
    corpus = args.corpus
    if corpus is None:
        corpus = Path(temp := tempfile.mkdtemp(prefix="compeft-fuzz-"))
    corpus.mkdir(parents=True, exist_ok=True)
    for seed in seed_files():
        target = corpus / f"seed-{seed.parent.name}-{seed.name}"
        if not target.exists():
            shutil.copyfile(seed, target)
    args.artifacts.mkdir(parents=True, exist_ok=True)
    flags = [f"-max_total_time={args.seconds}", "-timeout=20", "-rss_limit_mb=3072", "-max_len=65536",
             "-print_final_stats=1", f"-artifact_prefix={args.artifacts}/", *args.libfuzzer, str(corpus)]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    child = subprocess.run([sys.executable, __file__, "--child", *flags], env=env, capture_output=True, text=True)
    output = child.stdout + child.stderr
    runs = _stat(output, "number_of_executed_units")
    crashes = sorted(p.name for p in args.artifacts.glob("crash-*")) + sorted(
        p.name for p in args.artifacts.glob("timeout-*")) + sorted(p.name for p in args.artifacts.glob("oom-*"))
    size = sum(1 for _ in corpus.iterdir())
    print(f"fuzz: {runs if runs is not None else '?'} inputs in {args.seconds} s (each run as given and repaired), "
          f"corpus {size} files, exit {child.returncode}, findings: {crashes or 'none'}")
    if child.returncode != 0:
        print(output[-6000:], file=sys.stderr)
    if temp:
        shutil.rmtree(temp, ignore_errors=True)
    return 0 if child.returncode == 0 and not crashes else 1


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        del sys.argv[1]
        _fuzz_child()
    else:
        sys.exit(main())
